"""Grouped-GEMM experts (`model.moe.grouped_gemm`, Transformer Engine's TEGroupedMLP).

TE is absent on CPU, so the mapping is checked on a fake module tree with TEGroupedMLP's
parameter names (`mlp.experts.linear_fc1.weight{i}` / `linear_fc2.weight{i}`, i the local
expert) grafted onto a local-spec model: HF -> grouped names loads every expert where
SequentialMLP has it (EP offset included), and the HF export stream from the grouped
names reproduces the checkpoint bit for bit, at EP=1 and EP=2. The GPU check with real TE
is tools/gpu_moe_te_check.py.
"""
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_tiny_hf, run_multiproc

_GROUPED = re.compile(r"^decoder\.layers\.\d+\.mlp\.experts\.linear_fc[12]\.weight\d+$")


class _GroupedLinear(torch.nn.Module):
    """TE GroupedLinear's parameter layout: one `weight{i}` per local expert."""

    def __init__(self, like: list[torch.Tensor]):
        super().__init__()
        for i, w in enumerate(like):
            self.register_parameter(f"weight{i}", torch.nn.Parameter(torch.full_like(w, float("nan"))))


class _FakeTEGroupedMLP(torch.nn.Module):
    def __init__(self, sequential):
        super().__init__()
        self.linear_fc1 = _GroupedLinear([e.linear_fc1.weight for e in sequential.local_experts])
        self.linear_fc2 = _GroupedLinear([e.linear_fc2.weight for e in sequential.local_experts])


def _grouped_worker(rank, world, hf_dir, out):
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.models.hf_io import HFTensorReader
    from megatron_rl.models.loading import load_hf_weights
    from megatron_rl.models.moe import expert_offset
    from megatron_rl.models.weight_mapping import MOE_RULES, canonical_name
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(ep=world)
    model = load_checkpoint(hf_dir, layer_spec="local")
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer in model.decoder.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts = _FakeTEGroupedMLP(layer.mlp.experts)
    grouped = [n for n, _ in model.named_parameters() if ".experts." in n]
    n_local = model.arch.num_experts // world
    n_sparse = sum(model.arch.moe_layers or [1] * model.arch.num_layers)
    assert len(grouped) == 2 * n_local * n_sparse and all(_GROUPED.match(n) for n in grouped), grouped
    assert load_hf_weights(model, hf_dir) == len(ref)
    params = dict(model.named_parameters())
    for n in grouped:                                   # same values as SequentialMLP's local expert
        assert torch.equal(params[n], ref[canonical_name(n)]), n
    reader, down = HFTensorReader(hf_dir), MOE_RULES[model.arch.family][2].hf[0]
    off = expert_offset(model.arch)
    for n in grouped:                                   # weight{i} is global expert off + i
        m = re.match(r"decoder\.layers\.(\d+)\.mlp\.experts\.linear_fc2\.weight(\d+)$", n)
        if m:
            hf_name = down.format(L=int(m.group(1)), E=off + int(m.group(2)))
            assert torch.equal(params[n], reader.get(hf_name)), (n, hf_name)
    exported = dict(iter_hf_weights(model))
    if rank == 0:
        torch.save(exported, out)
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.parametrize("family,ep", [("qwen3_moe", 1), ("qwen3_moe", 2), ("mixtral", 2)])
def test_grouped_expert_names_round_trip_hf(tmp_path, family, ep):
    hf = make_tiny_hf(tmp_path / "hf", family, tie=False)
    run_multiproc(_grouped_worker, ep, (hf, str(tmp_path / "out.pt")))
    ref = load_file(tmp_path / "hf" / "model.safetensors")
    got = torch.load(tmp_path / "out.pt")
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_canonical_name_maps_grouped_experts_to_sequential():
    from megatron_rl.models.weight_mapping import canonical_name
    assert canonical_name("decoder.layers.3.mlp.experts.linear_fc1.weight12") == \
        "decoder.layers.3.mlp.experts.local_experts.12.linear_fc1.weight"
    assert canonical_name("decoder.layers.0.mlp.experts.linear_fc2.weight0") == \
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"


def test_grouped_gemm_setting_resolves_per_layer_spec():
    from megatron_rl.models.moe import resolve_grouped_gemm
    assert resolve_grouped_gemm("auto", "te") is True     # bf16 parity 5.9e-3 on the H200 (docs/BENCHMARKS.md)
    assert resolve_grouped_gemm("auto", "sdpa") is False and resolve_grouped_gemm("auto", "local") is False
    assert resolve_grouped_gemm(False, "te") is False and resolve_grouped_gemm(True, "te") is True
    with pytest.raises(ValueError, match=r"model\.moe\.grouped_gemm=true needs model\.layer_spec=te"):
        resolve_grouped_gemm(True, "sdpa")


def test_grouped_gemm_config_values():
    from megatron_rl.config.loader import from_dict
    from megatron_rl.models.moe_config import MoEConfig
    assert from_dict(MoEConfig, {"grouped_gemm": True}).grouped_gemm is True
    assert from_dict(MoEConfig, {"grouped_gemm": "auto"}).grouped_gemm == "auto"
    assert MoEConfig(grouped_gemm="false").grouped_gemm is False
    with pytest.raises(ValueError, match="model.moe.grouped_gemm='fast'"):
        MoEConfig(grouped_gemm="fast")


def test_grouped_gemm_true_on_local_spec_is_refused_at_build(tmp_path):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.models.moe_config import MoEConfig
    from megatron_rl.parallel import init_distributed

    init_distributed()
    with pytest.raises(ValueError, match="model.moe.grouped_gemm"):
        load_checkpoint(make_tiny_hf(tmp_path / "hf", "qwen3_moe", tie=False), layer_spec="local",
                        moe=MoEConfig(grouped_gemm=True))


@pytest.mark.parametrize("overrides,spec", [
    ([], "te"),                                          # auto: te + TEGroupedMLP (3.23x, docs/BENCHMARKS.md)
    (["model.moe.grouped_gemm=false"], "sdpa"),          # SequentialMLP: the dense-shape choice
    (["model.moe.grouped_gemm=true"], "te"),             # a need
    (["model.layer_spec=sdpa"], "sdpa"),
])
def test_plan_picks_te_for_moe_on_gpu(overrides, spec):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import resolve_plan
    cfg = load_experiment_config(None, ["data.train_batch_size=8", "rollout.n=4", "model.dtype=bfloat16"] + overrides)
    plan = resolve_plan(cfg, world_size=8, device="cuda", shape="qwen3-30b-a3b", gpu_mem_gib=141)
    assert plan.model.layer_spec_choice == spec, plan.model.layer_spec_reason
    assert any("unfused attention" in n for n in plan.notes) == (spec == "te")   # padded micro-batches on te
    packed = resolve_plan(load_experiment_config(None, ["data.train_batch_size=8", "rollout.n=4",
                                                        "actor.max_tokens_per_microbatch=8192"] + overrides),
                          world_size=8, device="cuda", shape="qwen3-30b-a3b", gpu_mem_gib=141)
    assert not any("unfused attention" in n for n in packed.notes)
    assert resolve_plan(cfg, world_size=8, device="cpu", shape="qwen3-30b-a3b").model.layer_spec_choice == \
        ("sdpa" if "model.layer_spec=sdpa" in overrides else "local")
    dense = resolve_plan(load_experiment_config(None, ["data.train_batch_size=8", "rollout.n=4"]), world_size=8,
                         device="cuda", shape="qwen3-8b")
    assert dense.model.layer_spec_choice == "sdpa"


@pytest.mark.parametrize("te,grouped,spec,experts_grouped", [
    (True, "auto", "te", True), (False, "auto", "sdpa", False), (True, False, "sdpa", False)])
def test_builder_resolves_as_the_plan_on_gpu(monkeypatch, te, grouped, spec, experts_grouped):
    """On a GPU (faked: no model is built) the TransformerConfig's grouped experts and the spec
    the builder resolves again from that config agree: te + TEGroupedMLP where TE imports, else sdpa."""
    from types import SimpleNamespace

    from megatron_rl.models import layer_specs
    from megatron_rl.models.moe import resolve_grouped_gemm

    monkeypatch.setattr(layer_specs.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(layer_specs, "te_available", lambda: te)
    first = layer_specs.resolve_layer_spec_name("auto", moe=grouped is not False, grouped_gemm=grouped is True)
    assert first == spec and resolve_grouped_gemm(grouped, first) is experts_grouped
    config = SimpleNamespace(num_moe_experts=8, moe_grouped_gemm=experts_grouped)
    assert layer_specs.resolve_layer_spec_name("auto", config) == spec
    monkeypatch.setattr(layer_specs, "te_available", lambda: False)
    if grouped is True or experts_grouped:                # a need without TE is an error naming the key
        with pytest.raises(RuntimeError, match="model.moe.grouped_gemm=true"):
            layer_specs.resolve_layer_spec_name("auto", config)
