"""A tiny Megatron Llama (hidden 64, 4 layers, vocab 96) and random SAEs sized for it."""
import pytest
import torch

from tests.helpers import make_tiny_hf


def make_sae(arch="standard", d_in=64, d_sae=32, layer=1, seed=0, rows=None, **cfg_extra):
    """Random SAE in memory; `rows` = {feature: direction} overrides decoder rows."""
    from megatron_rl.steering import SAE

    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
         "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if arch == "gated":
        w.update(b_gate=torch.randn(d_sae, generator=g) * 0.1, b_mag=torch.randn(d_sae, generator=g) * 0.1,
                 r_mag=torch.randn(d_sae, generator=g) * 0.1)
    else:
        w["b_enc"] = torch.randn(d_sae, generator=g) * 0.1 + 0.2
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.1
    for f, vec in (rows or {}).items():
        w["W_dec"][f] = vec
    cfg = dict(architecture=arch, d_in=d_in, d_sae=d_sae, hook_name=f"blocks.{layer}.hook_resid_post", **cfg_extra)
    if arch == "topk":
        cfg.setdefault("k", 8)
    return SAE(cfg, w)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed

    init_distributed()
    hf = make_tiny_hf(tmp_path_factory.mktemp("hf"), "llama")
    model = load_checkpoint(hf, layer_spec="local").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 96, (3, 8), generator=torch.Generator().manual_seed(1))


def logits_of(model, ids, attention_mask=None):
    from megatron_rl.models.forward import gpt_forward

    with torch.no_grad():
        return gpt_forward(model, ids, attention_mask).float()
