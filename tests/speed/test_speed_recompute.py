"""Activation recomputation (`build_model(recompute=...)`) runs backward with unchanged gradients."""
import pytest
import torch

from tests.helpers import make_tiny_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rl.parallel import init_distributed
    init_distributed()
    return make_tiny_hf(tmp_path_factory.mktemp("speed_rc") / "hf", "llama")


def _grads(hf_dir, spec, recompute):
    from megatron_rl.models import arch_from_hf_config, build_model, load_hf_weights
    from megatron_rl.models.forward import gpt_forward
    model = build_model(arch_from_hf_config(hf_dir), layer_spec=spec, recompute=recompute)
    load_hf_weights(model, hf_dir)
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[0, :3] = 0
    gpt_forward(model.train(), ids, am).float().pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.fixture
def cpu_rng_shim(monkeypatch):
    """Megatron 0.16.1 `tensor_parallel.checkpoint` saves/restores the CUDA RNG state
    (random.py `_get_all_rng_states`); without CUDA there is none to save. This is the
    shim `parallel/cpu_compat.py` needs (reported to the lead)."""
    if not torch.cuda.is_available():
        from megatron.core.tensor_parallel import random as mrandom
        monkeypatch.setattr(mrandom, "_get_cuda_rng_state", lambda *a, **k: None)
        monkeypatch.setattr(mrandom, "_set_cuda_rng_state", lambda *a, **k: None)


@pytest.mark.parametrize("spec", ["local", "sdpa"])
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gradients_equal_no_recompute(hf_dir, cpu_rng_shim, spec, recompute):
    ref = _grads(hf_dir, spec, "none")
    got = _grads(hf_dir, spec, recompute)
    assert (got - ref).abs().max().item() < 1e-6


@pytest.mark.xfail(not torch.cuda.is_available(), strict=False,
                   reason="needs the CUDA-RNG shim for tensor_parallel.checkpoint in parallel/cpu_compat.py")
def test_recompute_full_runs_on_cpu_with_project_shims(hf_dir):
    assert _grads(hf_dir, "local", "full").abs().sum() > 0
