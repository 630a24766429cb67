"""model.fp8: the TransformerConfig mapping, the refusals (CPU, non-TE specs, shapes, engine),
`layer_spec: auto` resolution, and tools/bench_fp8.py's CPU-testable parts."""
import pytest

from megatron_rl.config.schema import Config
from megatron_rl.models.fp8 import check_fp8_values, fp8_problem, fp8_transformer_kwargs
from megatron_rl.models.layer_specs import choose_layer_spec
from megatron_rl.plan.layout import PlanError
from megatron_rl.plan.memory import Shape
from megatron_rl.plan.run_plan import resolve_plan

LLAMA_1B = Shape(16, 2048, 32, 8, 64, 8192, 128256, tie_word_embeddings=True)


def test_mapping_reaches_megatron_transformer_config():
    from megatron.core.transformer import TransformerConfig
    assert fp8_transformer_kwargs("none") == {}
    kw = fp8_transformer_kwargs("hybrid", "delayed")
    assert kw == dict(fp8="hybrid", fp8_recipe="delayed", fp8_margin=0, fp8_wgrad=True,
                      fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, bf16=True)
    cfg = TransformerConfig(**base, **kw)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_amax_history_len, cfg.first_last_layers_bf16) == ("hybrid", "delayed",
                                                                                                 1024, False)
    kw = fp8_transformer_kwargs("e4m3", "tensorwise", bf16_layers=1)
    cfg = TransformerConfig(**base, **kw)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.first_last_layers_bf16) == ("e4m3", "tensorwise", True)
    assert (cfg.num_layers_at_start_in_bf16, cfg.num_layers_at_end_in_bf16) == (1, 1)
    assert "fp8_amax_history_len" not in kw          # current scaling has no history


@pytest.mark.parametrize("args,match", [
    (("fp16", "delayed", 0), "model.fp8 must be"),
    (("hybrid", "mxfp8", 0), "model.fp8_recipe must be"),
    (("hybrid", "delayed", 1), "model.fp8_bf16_layers=1 needs model.fp8_recipe: tensorwise"),
    (("none", "tensorwise", 0), "model.fp8_recipe is set but model.fp8 is none"),
    (("none", "delayed", 2), "model.fp8_bf16_layers is set but model.fp8 is none"),
    (("hybrid", "tensorwise", -1), "model.fp8_bf16_layers must be >= 0"),
])
def test_bad_values_are_refused_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        check_fp8_values(*args)


def _cfg(**model):
    cfg = Config()
    cfg.model.dtype = "bfloat16"
    cfg.model.fp8 = "hybrid"
    cfg.rollout.engine = "vllm"
    cfg.actor.max_tokens_per_microbatch = 4096
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def test_problems_name_the_reason():
    m = _cfg().model
    ok = dict(device="cuda", layer_spec="te", shape=LLAMA_1B, engine="vllm", max_tokens_per_microbatch=4096)
    assert fp8_problem(m, **ok) is None
    assert "needs a CUDA GPU" in fp8_problem(m, **{**ok, "device": "cpu"})
    for spec in ("local", "sdpa"):
        assert "needs model.layer_spec te" in fp8_problem(m, **{**ok, "layer_spec": spec})
    assert "native engine" in fp8_problem(m, **{**ok, "engine": "native"})
    assert "actor.max_tokens_per_microbatch" in fp8_problem(m, **{**ok, "max_tokens_per_microbatch": 0})
    assert "divisible by 16" in fp8_problem(m, **{**ok, "shape": Shape(2, 72, 4, 2, 18, 200, 96)})
    moe = Shape(2, 64, 4, 2, 16, 128, 96, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32)
    assert "mixture-of-experts" in fp8_problem(m, **{**ok, "shape": moe})
    assert "model.dtype bfloat16" in fp8_problem(_cfg(dtype="float32").model, **ok)
    m2 = _cfg(fp8_recipe="tensorwise", fp8_bf16_layers=9).model
    assert "exceeds the layers per pipeline stage (8" in fp8_problem(m2, **{**ok, "shape": LLAMA_1B}, pp=2)


def test_plan_refuses_fp8_on_cpu_and_with_non_te_specs():
    with pytest.raises(PlanError, match="model.fp8=hybrid needs a CUDA GPU"):
        resolve_plan(_cfg(), world_size=1, device="cpu")
    with pytest.raises(PlanError, match="needs model.layer_spec te .* got sdpa"):
        resolve_plan(_cfg(layer_spec="sdpa"), world_size=1, device="cuda", shape="llama-1b")
    with pytest.raises(PlanError, match="model.fp8_recipe must be"):
        resolve_plan(_cfg(fp8_recipe="blockwise"), world_size=1, device="cuda", shape="llama-1b")


def test_plan_with_fp8_picks_te_and_says_why():
    plan = resolve_plan(_cfg(), world_size=1, device="cuda", shape="llama-1b")
    assert (plan.model.layer_spec_choice, plan.model.fp8) == ("te", "hybrid")
    text = plan.summary()
    assert "te (auto: needed by model.fp8" in text and "hybrid, delayed recipe" in text


def test_auto_layer_spec_choice():
    assert choose_layer_spec("auto", "cpu", fp8=True)[0] == "local"
    spec, why = choose_layer_spec("auto", "cuda")
    assert spec == "sdpa" and "2.13 vs 2.23 s" in why
    assert choose_layer_spec("auto", "cuda", fp8=True)[0] == "te"
    assert choose_layer_spec("auto", "cuda", cp=2)[0] == "sdpa"                 # sdpa's all-gather CP
    assert choose_layer_spec("auto", "cuda", cp=2, fp8=True)[0] == "te"
    assert choose_layer_spec("auto", "cuda", sequence_parallel=True, tp=2)[0] == "te"
    assert choose_layer_spec("auto", "cuda", sequence_parallel=True, tp=1)[0] == "sdpa"
    assert choose_layer_spec("auto", "cuda", grouped_gemm=True)[0] == "te"
    spec, why = choose_layer_spec("auto", "cuda", moe=True)           # the plan: TE's presence unknown
    assert spec == "te" and "3.23x" in why and "sdpa where transformer_engine does not import" in why
    assert choose_layer_spec("auto", "cuda", moe=True, te_importable=True)[0] == "te"
    assert choose_layer_spec("auto", "cuda", moe=True, te_importable=False)[0] == "sdpa"
    assert choose_layer_spec("auto", "cuda", moe=False, te_importable=True)[0] == "sdpa"   # dense, or grouped_gemm false
    assert choose_layer_spec("auto", "cpu", moe=True, te_importable=True)[0] == "local"
    with_fp8 = choose_layer_spec("auto", "cuda", moe=True, fp8=True, te_importable=False)
    assert with_fp8[0] == "te" and "model.fp8" in with_fp8[1]                # a need stays a need (build refuses)
    assert choose_layer_spec("local", "cuda", fp8=True) == ("local", "set by model.layer_spec")
    cfg = Config()
    plan = resolve_plan(cfg, world_size=1, device="cpu")
    assert plan.model.layer_spec_choice == "local" and "fp8" in plan.summary()


def test_packed_streams_align_to_16_under_fp8():
    from megatron_rl.trainer.policy import packed_shape
    assert packed_shape(100, tp=1, pp=1, sequence_parallel=False, fp8=True) == (None, 16)
    assert packed_shape(100, tp=2, pp=2, sequence_parallel=True, fp8=True) == (128, 32)


def test_bench_fp8_args_table_and_batches():
    import torch
    from tools.bench_fp8 import MODELS, config_overrides, CONFIGS, format_table, make_work, parse_args
    args = parse_args([])
    assert args.models == "llama-1b,smollm2-1.7b" and args.budget == 16384
    with pytest.raises(SystemExit):
        parse_args(["--configs", "te-fp9"])
    with pytest.raises(SystemExit):
        parse_args(["--budget", "4100"])
    assert config_overrides(CONFIGS["te-bf16"]) == {}
    assert config_overrides(CONFIGS["te-fp8-tensorwise"])["fp8_recipe"] == "tensorwise"
    rows = [dict(model="llama-1b", config="te-bf16", step_s=1.0, tokens_per_s=30000, tflops=300.0,
                 pct_bf16_peak=41.7, peak_mem_gib=20.0, lp_mean_abs=0.0, lp_max_abs=0.0),
            dict(model="llama-1b", config="te-fp8-delayed", step_s=0.8, tokens_per_s=37500, tflops=375.0,
                 pct_bf16_peak=52.1, peak_mem_gib=19.0, lp_mean_abs=0.0123, lp_max_abs=0.25),
            dict(model="llama-1b", config="te-fp8-tensorwise", error="RuntimeError: boom")]
    table = format_table(rows)
    assert "| llama-1b | te-fp8-delayed | 0.8 | 37500 | 375.0 | 52.1 | 1.25x | 19.0 | 0.0123 | 0.25 |" in table
    assert "error: RuntimeError: boom" in table
    a = parse_args(["--samples", "4", "--seq", "1024", "--budget", "2048"])
    w = make_work(MODELS["tiny"], a, torch.device("cpu"))
    assert all(mb["packed"].num_tokens % 16 == 0 for mb in w.microbatches)
    assert w.tokens == sum(int((mb["packed"].rows >= 0).sum()) for mb in w.microbatches)
    assert all(0 < int(mb["resp"].sum()) < mb["packed"].num_tokens for mb in w.microbatches)


def test_vllm_fp8_quantization_is_refused_by_name():
    from megatron_rl.rollout.vllm_config import VLLMConfig
    assert VLLMConfig().quantization == ""
    with pytest.raises(ValueError, match="rollout.vllm.quantization='fp8': not supported yet: .*layerwise reload"):
        VLLMConfig(quantization="fp8")
    with pytest.raises(ValueError, match="rollout.vllm.extra_args.quantization: use rollout.vllm.quantization"):
        VLLMConfig(extra_args={"quantization": "fp8"})
