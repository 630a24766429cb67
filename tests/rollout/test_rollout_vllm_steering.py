"""Steering hooks for vLLM-style decoder layers, which return `(hidden, residual)` with the
full residual stream `hidden + residual`: the hooked model equals a reference that applies
the intervention to the stream after layer L (what the native engine steers)."""
import pytest
import torch

from megatron_rl.steering.interventions import build_intervention
from megatron_rl.steering.sae import SAE
from megatron_rl.steering.vllm_hooks import attach_vllm_steering, set_vllm_steering

D, LAYER = 16, 1


class VLLMStyleLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, positions, hidden_states, residual):
        residual = hidden_states if residual is None else hidden_states + residual
        return torch.tanh(self.lin(residual)), residual


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([VLLMStyleLayer() for _ in range(3)])


class VLLMStyleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = Inner()

    def forward(self, positions, x):
        h, r = x, None
        for layer in self.model.layers:
            h, r = layer(positions, h, r)
        return h + r

    def reference(self, x, edit):
        """Stream s_{i+1} = s_i + f_i(s_i); `edit(s)` after layer LAYER."""
        s = x
        for i, layer in enumerate(self.model.layers):
            s = s + torch.tanh(layer.lin(s))
            if i == LAYER:
                s = edit(s)
        return s


def _sae():
    g = torch.Generator().manual_seed(1)
    d_sae = 24
    return SAE({"architecture": "standard", "d_in": D, "d_sae": d_sae, "hook_name": f"blocks.{LAYER}.hook_resid_post"},
               {"W_enc": torch.randn(D, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g) * 0.1,
                "W_dec": torch.randn(d_sae, D, generator=g), "b_dec": torch.randn(D, generator=g) * 0.1})


def _tokens():
    return torch.arange(6), torch.randn(6, D, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mode", ["add", "clamp", "direction_clamp"])
def test_rollout_vllm_hook_steers_the_full_residual_stream(mode):
    model = VLLMStyleModel()
    iv = build_intervention(mode, _sae(), feature_idxs=[3, 5], strengths=[2.0, -1.0], max_activations=[1.5, 0.5])
    pos, x = _tokens()
    with torch.no_grad():
        plain = model(pos, x)
        attach_vllm_steering(model, iv, LAYER)
        steered = model(pos, x)
        ref = model.reference(x, lambda s: iv.apply(s, iv.default_strengths()[None]))
    assert (steered - plain).abs().max() > 0.1
    assert (steered - ref).abs().max() < 1e-5


def test_rollout_vllm_hook_per_call_strengths_and_disable():
    model = VLLMStyleModel()
    iv = build_intervention("add", _sae(), feature_idxs=[3])
    pos, x = _tokens()
    with torch.no_grad():
        plain = model(pos, x)
        attach_vllm_steering(model, iv, LAYER)
        assert set_vllm_steering(model, torch.tensor([4.0]))
        steered = model(pos, x)
        ref = model.reference(x, lambda s: iv.apply(s, torch.tensor([[4.0]])))
        set_vllm_steering(model, enabled=False)
        off = model(pos, x)
    assert (steered - ref).abs().max() < 1e-5
    assert torch.equal(off, plain)


@pytest.mark.parametrize("scope", ["generated", "prompt"])
def test_rollout_vllm_hook_scope_uses_positions(scope):
    model = VLLMStyleModel()
    iv = build_intervention("add", _sae(), feature_idxs=[3], strengths=[3.0])
    pos, x = _tokens()                       # positions 0..5; the prompt is the first 4 tokens
    with torch.no_grad():
        attach_vllm_steering(model, iv, LAYER, scope=scope)
        set_vllm_steering(model, None, prompt_len=4)
        steered = model(pos, x)
        gen = (pos >= 4)[:, None]
        keep = gen if scope == "generated" else ~gen
        ref = model.reference(x, lambda s: torch.where(keep, iv.apply(s, iv.default_strengths()[None]), s))
    assert (steered - ref).abs().max() < 1e-5


def test_rollout_vllm_hook_without_prompt_length_is_an_error():
    model = VLLMStyleModel()
    hook = attach_vllm_steering(model, build_intervention("add", _sae(), feature_idxs=[3]), LAYER, scope="generated")
    with pytest.raises(ValueError, match="needs the group's prompt length"):
        hook.set_state(None, None)


def test_rollout_vllm_hook_layer_out_of_range():
    with pytest.raises(ValueError, match="steering layer 7 out of range for a vLLM model with 3 layers"):
        attach_vllm_steering(VLLMStyleModel(), build_intervention("add", _sae(), feature_idxs=[3]), 7)
