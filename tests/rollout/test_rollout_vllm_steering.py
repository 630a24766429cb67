"""Steering hooks for vLLM-style decoder layers, which return `(hidden, residual)` with the
full residual stream `hidden + residual`: the hooked model equals a reference that applies
the intervention to the stream after layer L (what the native engine steers)."""
import json

import pytest
import torch

from megatron_rl.steering.interventions import build_intervention
from megatron_rl.steering.sae import SAE
from megatron_rl.steering.vllm_graph import (LAYERS_KEY, NO_LIMIT, STEERED_ARCH, SteeredOutput, fill_token_slots,
                                             graph_overrides, layer_index, position_window)
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


# --- CUDA-graph mode: the add built into the layer, state in persistent buffers ------------------

class GraphStyleLayer(SteeredOutput, VLLMStyleLayer):
    """What vllm_graph_model.SteeredLlamaDecoderLayer does, on the toy layer."""

    def __init__(self, steered: bool):
        super().__init__()
        self.mrl_steered = steered
        if steered:
            self.init_steering(D, max_reqs=4, max_tokens=32)

    def forward(self, positions, hidden_states, residual):
        h, r = super().forward(positions, hidden_states, residual)
        return (self.steer_output(positions, h) if self.mrl_steered else h), r


def _graph_model():
    model = VLLMStyleModel()
    eager = VLLMStyleModel()
    for i, layer in enumerate(model.model.layers):
        g = GraphStyleLayer(i == LAYER)
        g.lin.load_state_dict(layer.lin.state_dict())
        model.model.layers[i] = g
    return model, eager


@pytest.mark.parametrize("scope", ["all", "generated", "prompt"])
def test_rollout_vllm_graph_steering_matches_the_eager_hook(scope):
    model, eager = _graph_model()
    iv = build_intervention("add", _sae(), feature_idxs=[3, 5], strengths=[2.0, -1.0])
    pos, x = _tokens()
    with torch.no_grad():
        plain = model(pos, x)
        buffers = [b.data_ptr() for b in model.buffers()]
        attach_vllm_steering(model, iv, LAYER, scope=scope, graph=True)
        attach_vllm_steering(eager, iv, LAYER, scope=scope)
        for strengths in (None, torch.tensor([4.0, 1.0])):
            for m in (model, eager):
                set_vllm_steering(m, strengths, prompt_len=4)
            steered, ref = model(pos, x), eager(pos, x)
            assert (steered - plain).abs().max() > 0.1
            assert (steered - ref).abs().max() < 1e-5
        set_vllm_steering(model, None, prompt_len=4, enabled=False)
        assert torch.equal(model(pos, x), plain)
    assert [b.data_ptr() for b in model.buffers()] == buffers      # in place: captured graphs stay valid


def test_rollout_vllm_graph_steering_needs_the_buffers_and_an_additive_mode():
    with pytest.raises(RuntimeError, match="layer 1 has no steering buffers"):
        attach_vllm_steering(VLLMStyleModel(), build_intervention("add", _sae(), feature_idxs=[3]), LAYER, graph=True)
    model, _ = _graph_model()
    with pytest.raises(ValueError, match="'clamp' needs rollout.vllm.enforce_eager=true"):
        attach_vllm_steering(model, build_intervention("clamp", _sae(), feature_idxs=[3], max_activations=[1.0]),
                             LAYER, graph=True)


def test_rollout_vllm_graph_overrides_check_the_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert graph_overrides(tmp_path, 5) == {"architectures": [STEERED_ARCH], LAYERS_KEY: [5]}
    with pytest.raises(ValueError, match="'direction_clamp' needs rollout.vllm.enforce_eager=true"):
        graph_overrides(tmp_path, 5, "direction_clamp")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    with pytest.raises(ValueError, match=r"config.json: architectures=\['Qwen3MoeForCausalLM'\]"):
        graph_overrides(tmp_path, 5)
    with pytest.raises(ValueError, match="cannot read"):
        graph_overrides(tmp_path / "missing", 5)


def test_rollout_vllm_graph_layer_index_and_window():
    assert layer_index("model.layers.12") == 12
    assert position_window("all", None) == (0, NO_LIMIT)
    assert position_window("generated", 7) == (7, NO_LIMIT)
    assert position_window("prompt", 7) == (0, 7)


@pytest.mark.parametrize("graph", [False, True])
def test_rollout_vllm_detach_restores_the_plain_model(graph):
    from megatron_rl.steering.vllm_hooks import detach_vllm_steering

    model = _graph_model()[0] if graph else VLLMStyleModel()
    pos, x = _tokens()
    with torch.no_grad():
        plain = model(pos, x)
        attach_vllm_steering(model, build_intervention("add", _sae(), feature_idxs=[3]), LAYER, graph=graph)
        assert not torch.equal(model(pos, x), plain)
        assert detach_vllm_steering(model) and not detach_vllm_steering(model)
        assert torch.equal(model(pos, x), plain)


@pytest.mark.parametrize("scope", ["all", "generated"])
def test_rollout_vllm_graph_per_request_rows_in_one_batch(scope):
    """Three requests with their own strengths and prompt lengths in one scheduled batch (what
    SteeringModelState does each step) == each request steered alone by the eager hook."""
    model, eager = _graph_model()
    iv = build_intervention("add", _sae(), feature_idxs=[3], strengths=[2.0])
    hook = attach_vllm_steering(model, iv, LAYER, scope=scope, graph=True)
    attach_vllm_steering(eager, iv, LAYER, scope=scope)
    assert not hook.per_request                          # no ModelState has mapped slots yet
    g = torch.Generator().manual_seed(3)
    # batch order: request slots 2, 0, 3 with 3, 4 and 2 scheduled tokens (request-local positions)
    reqs = [(2, {"strengths": [5.0], "enabled": True}, 2, torch.tensor([1, 2, 3])),
            (0, {"strengths": [-3.0], "enabled": True}, 1, torch.tensor([0, 1, 2, 3])),
            (3, {"strengths": None, "enabled": False}, 1, torch.tensor([4, 5]))]
    xs = [torch.randn(len(p), D, generator=g) for *_, p in reqs]
    with torch.no_grad():
        for slot, spec, plen, _ in reqs:
            hook.bind_request(slot, spec, plen)
        layer = model.model.layers[LAYER]
        fill_token_slots(layer, torch.tensor([2, 0, 3]), torch.tensor([0, 3, 7, 9]), 3, 9)
        out = model(torch.cat([p for *_, p in reqs]), torch.cat(xs))
        refs = []
        for (slot, spec, plen, pos), x in zip(reqs, xs):
            set_vllm_steering(eager, spec["strengths"], prompt_len=plen, enabled=spec["enabled"])
            refs.append(eager(pos, x))
    assert torch.allclose(out, torch.cat(refs), atol=1e-5)
    assert (refs[0] - model.reference(xs[0], lambda s: s)).abs().max() > 0.1     # steering did act
    assert layer.mrl_token_slot[9:].eq(4).all() and layer.mrl_delta[4].eq(0).all()   # padding: the zero spare row


def test_rollout_vllm_graph_request_without_spec_takes_the_call_state():
    model, eager = _graph_model()
    iv = build_intervention("add", _sae(), feature_idxs=[3], strengths=[2.0])
    hook = attach_vllm_steering(model, iv, LAYER, graph=True)
    attach_vllm_steering(eager, iv, LAYER)
    pos, x = _tokens()
    with torch.no_grad():
        set_vllm_steering(model, torch.tensor([4.0]))
        hook.bind_request(1, None, 0)
        fill_token_slots(model.model.layers[LAYER], torch.tensor([1]), torch.tensor([0, 6]), 1, 6)
        set_vllm_steering(eager, torch.tensor([4.0]))
        assert torch.allclose(model(pos, x), eager(pos, x), atol=1e-5)
