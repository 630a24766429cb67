"""The run plan and memory planner count the vision tower (weights on the first stage,
replicated over TP; grads and optimizer state only when it trains) and the image tokens;
model.freeze_vision=false on a text model is refused by name; the 7B GPU config fits."""
from pathlib import Path

import pytest

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import PlanError, resolve_plan
from megatron_rl.plan import memory as mp
from tests.models.vl_fixtures import tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[2]
SHAPE_7B = str(ROOT / "configs" / "shapes" / "qwen2_5_vl_7b.json")
CONFIG_7B = ROOT / "configs" / "qwen2_5_vl_7b_vgr_gpu.yaml"


def test_planner_params_equal_the_transformers_model(tmp_path):
    import transformers
    hf = tiny_qwen2_5_vl(tmp_path / "hf")
    shape = mp.resolve_shape(hf)
    model = transformers.AutoModelForImageTextToText.from_pretrained(hf)
    assert mp.total_params(shape) == sum(p.numel() for p in model.parameters())
    assert shape.vision.params == sum(p.numel() for p in model.model.visual.parameters())


def test_qwen2_5_vl_7b_shape_is_the_published_size():
    shape = mp.resolve_shape(SHAPE_7B)
    assert mp.total_params(shape) == 8_292_166_656 and shape.vision.params == 676_550_144


def _estimate(**kw):
    base = dict(shape=mp.resolve_shape(SHAPE_7B), gpus=8, tp=2, micro_batch=2, seq_len=4096, image_tokens=1280)
    return mp.estimate(mp.PlanInputs(**{**base, **kw}))


def test_frozen_tower_has_weights_but_no_grads_or_optimizer_state():
    vs = mp.resolve_shape(SHAPE_7B).vision
    frozen, trained = _estimate(), _estimate(vision_trainable=True)
    assert frozen.components["actor weights"] == trained.components["actor weights"]
    assert trained.components["actor grads"] - frozen.components["actor grads"] == vs.params * 4   # fp32 main grads
    assert trained.components["optimizer"] - frozen.components["optimizer"] == pytest.approx(vs.params * 12 / 4)
    assert trained.components["vision activations"] == 32 * frozen.components["vision activations"]   # all blocks


def test_vision_tower_is_replicated_over_tp_and_lives_on_the_first_stage():
    vs = mp.resolve_shape(SHAPE_7B).vision
    s = mp.resolve_shape(SHAPE_7B)
    text_only = mp.Shape(**{**s.__dict__, "vision": None})
    for tp in (1, 2, 4):
        assert mp.stage_params(s, tp, 1, "only") - mp.stage_params(text_only, tp, 1, "only") == vs.params
    assert mp.stage_params(s, 2, 2, "first") - mp.stage_params(text_only, 2, 2, "first") == vs.params
    assert mp.stage_params(s, 2, 2, "last") == mp.stage_params(text_only, 2, 2, "last")


def test_image_tokens_scale_the_vision_activations():
    a, b = _estimate(image_tokens=640), _estimate(image_tokens=1280)
    assert b.components["vision activations"] == 2 * a.components["vision activations"] > 0


def test_run_plan_reads_image_tokens_and_freeze_vision():
    cfg = load_experiment_config(str(CONFIG_7B), [])
    plan = resolve_plan(cfg, world_size=8, device="cuda", shape=SHAPE_7B)
    # max_pixels 1003520 / (14 * 2)^2 = 1280 image tokens, within max_prompt_length 2048
    assert (plan.model.image_tokens, plan.model.freeze_vision) == (1280, True)
    assert plan.memory.fits and plan.memory.gpu_mem_gib == 80.0
    assert "vision activations" in plan.memory.components_gib


def test_freeze_vision_false_on_a_text_model_is_refused_by_name():
    cfg = load_experiment_config(None, ["data.train_batch_size=8", "rollout.n=4", "model.freeze_vision=false"])
    with pytest.raises(PlanError, match="model.freeze_vision=false"):
        resolve_plan(cfg, world_size=1, device="cpu", shape="smollm2-135m")
