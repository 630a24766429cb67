"""The run plan refuses packed micro-batches (`actor.max_tokens_per_microbatch > 0`) with a
vision-language model up front, by the key's name; text models still pack."""
from pathlib import Path

import pytest

from megatron_rl.config import load_experiment_config
from megatron_rl.plan import PlanError, resolve_plan

ROOT = Path(__file__).resolve().parents[2]
SHAPE_7B = str(ROOT / "configs" / "shapes" / "qwen2_5_vl_7b.json")


def test_packing_with_a_vision_language_model_is_refused_by_the_plan():
    cfg = load_experiment_config(str(ROOT / "configs" / "qwen2_5_vl_7b_vgr_gpu.yaml"),
                                 ["actor.max_tokens_per_microbatch=8192"])
    with pytest.raises(PlanError, match=r"actor.max_tokens_per_microbatch=8192 .*vision-language"):
        resolve_plan(cfg, world_size=8, device="cuda", shape=SHAPE_7B)


def test_packing_with_a_text_model_still_plans():
    cfg = load_experiment_config(None, ["data.train_batch_size=8", "rollout.n=4",
                                        "actor.max_tokens_per_microbatch=4096"])
    plan = resolve_plan(cfg, world_size=1, device="cpu", shape="smollm2-135m")
    assert plan.model.image_tokens == 0
