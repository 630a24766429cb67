"""The "sdpa" layer spec computes what the "local" spec computes (CPU, float32)."""
import pytest
import torch

from tests.helpers import make_tiny_hf


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from megatron_rl.parallel import init_distributed
    init_distributed()
    root = tmp_path_factory.mktemp("speed_sdpa")
    return {fam: make_tiny_hf(root / fam, fam, tie=(fam == "llama")) for fam in ("llama", "qwen2")}


def _batch(masked: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (3, 14), generator=g)
    am = torch.ones_like(ids)
    if masked:   # left-padded prompt, right-padded response
        am[0, :3] = 0
        am[1, 10:] = 0
        am[2, :2] = 0
        am[2, 12:] = 0
    return ids, am


def _models(hf_dir):
    from megatron_rl.models import load_checkpoint
    return load_checkpoint(hf_dir, layer_spec="local"), load_checkpoint(hf_dir, layer_spec="sdpa")


def test_sdpa_spec_uses_sdpa_core_attention(hf_dirs):
    from megatron_rl.models.sdpa_attention import SDPAttention
    _, model = _models(hf_dirs["llama"])
    assert model.layer_spec_name == "sdpa"
    assert all(isinstance(l.self_attention.core_attention, SDPAttention) for l in model.decoder.layers)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padding_mask"])
def test_sdpa_logits_match_local(hf_dirs, family, masked):
    from megatron_rl.models.forward import gpt_forward
    local, sdpa = _models(hf_dirs[family])
    ids, am = _batch(masked)
    with torch.no_grad():
        ref, out = gpt_forward(local.eval(), ids, am), gpt_forward(sdpa.eval(), ids, am)
    real = am.bool()
    assert out.shape == ref.shape == (3, 14, 96)
    assert (out - ref)[real].abs().max().item() < 1e-5


def test_sdpa_gradients_match_local(hf_dirs):
    from megatron_rl.models.forward import gpt_forward
    local, sdpa = _models(hf_dirs["llama"])
    ids, am = _batch(True)
    grads = []
    for m in (local.train(), sdpa.train()):
        (gpt_forward(m, ids, am) * am[..., None]).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5
