"""The actor path of a tiny random Qwen2.5-VL on image prompts read by the dataset: per-token
log-probs equal transformers' (images and M-RoPE positions reach the model, filler rows of a
short micro-batch included), an update step trains, VGR weights read the image span, and
packed micro-batches are refused by name."""
import pytest
import torch

from tests.models.vl_fixtures import tiny_images, tiny_qwen2_5_vl

R = 4


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """(model dir, tokenizer, rolled-out-looking batch of 3 image/text prompts)."""
    import transformers

    from megatron_rl.data import DataConfig, RLDataset, collate_prompts
    from megatron_rl.data.writers import write_jsonl
    from megatron_rl.parallel import init_distributed

    init_distributed()
    root = tmp_path_factory.mktemp("vl_policy")
    vl_dir = tiny_qwen2_5_vl(root / "model")
    for i, im in enumerate(tiny_images()):
        im.save(root / f"{i}.png")
    write_jsonl(root / "t.jsonl", [{"prompt": "<image> how many red circles are there ?", "images": ["0.png"]},
                                   {"prompt": "describe the picture <image>", "images": ["1.png"]},
                                   {"prompt": "how many blue squares are there ?"}])
    tok = transformers.AutoTokenizer.from_pretrained(vl_dir)
    ds = RLDataset([str(root / "t.jsonl")], tok, DataConfig(max_prompt_length=64))
    batch = collate_prompts([ds[i] for i in range(3)], tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    batch["response_ids"] = torch.randint(20, 60, (3, R), generator=g)
    batch["response_mask"] = torch.ones(3, R)
    batch["response_mask"][1, 2:] = 0
    return vl_dir, tok, batch


def _hf_logprobs(vl_dir, batch):
    import transformers

    from megatron_rl.trainer.microbatch import model_inputs

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_dir, dtype=torch.float32)
    ids, am = model_inputs(batch)
    imgs = [s["images"] for s in batch.samples if "images" in s]
    mm = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, mm_token_type_ids=mm,
                       pixel_values=torch.cat([x.pixel_values for x in imgs]),
                       image_grid_thw=torch.cat([x.image_grid_thw for x in imgs])).logits
    p = batch["prompt_ids"].shape[1]
    lp = logits[:, p - 1:-1].log_softmax(-1).gather(-1, batch["response_ids"][..., None])[..., 0]
    return lp * batch["response_mask"]


def _actor(vl_dir, lr=0.0, **kw):
    from megatron_rl.config.schema import OptimConfig
    from megatron_rl.models import load_checkpoint
    from megatron_rl.trainer.build import build_optimizer, wrap_ddp
    from megatron_rl.trainer.policy import Policy

    model = load_checkpoint(vl_dir, layer_spec="local")
    if not lr:
        return Policy(model, micro_batch_size=2, **kw)
    ddp = wrap_ddp(model, False)
    opt, sched = build_optimizer(ddp, OptimConfig(lr=lr, clip_grad=1.0), "float32", 10)
    return Policy(model, micro_batch_size=2, optimizer=opt, scheduler=sched, ddp_model=ddp, **kw)


def test_actor_logprobs_on_image_prompts_equal_transformers(vl):
    vl_dir, _, batch = vl
    lp, _ = _actor(vl_dir).compute_logprobs(batch)
    assert (lp - _hf_logprobs(vl_dir, batch)).abs().max() < 1e-4


def test_update_on_image_prompts_trains(vl):
    from megatron_rl.algos.config import AlgosConfig

    vl_dir, _, batch = vl
    actor = _actor(vl_dir, lr=1e-2)
    b = batch.select(range(3))
    b["old_logprob"], _ = actor.compute_logprobs(b)
    b["advantages"] = torch.tensor([[1.0], [-1.0], [0.5]]).expand(3, R).clone()
    steps = actor.update(b, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)
    assert steps and all(s["update_ok"] == 1.0 and s["grad_norm"] > 0 for s in steps)
    after, _ = actor.compute_logprobs(b)
    assert (after - b["old_logprob"]).abs().max() > 1e-3


def test_vgr_weights_read_the_image_span(vl):
    from megatron_rl.token_weights.config import TokenWeightsConfig
    from megatron_rl.token_weights.phase import VGRWeights

    vl_dir, tok, batch = vl
    b = batch.select(range(3))
    cfg = TokenWeightsConfig(source="vgr", last_k_layers=2, micro_batch_size=2, clip=None)
    metrics = VGRWeights(cfg, _actor(vl_dir), tok)(None, b)
    w, mask = b["token_weights"], b["response_mask"]
    assert torch.isfinite(w).all() and (w[mask == 0] == 0).all()
    for i in (0, 1):                                   # image rows: mean 1 over the response
        assert abs(float(w[i][mask[i] > 0].mean()) - 1) < 1e-5
    assert (w[2][mask[2] > 0] == 1).all()              # the text-only row has no context: weights 1
    pads = (b["prompt_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()
    assert abs(metrics["token_weights/context_frac"] - float(pads / b["prompt_mask"].sum())) < 1e-6


def test_packed_microbatches_with_images_are_refused_by_name(vl):
    vl_dir, _, batch = vl
    with pytest.raises(ValueError, match="actor.max_tokens_per_microbatch"):
        _actor(vl_dir, max_tokens_per_microbatch=128).compute_logprobs(batch)


def test_grpo_on_the_image_task_with_vgr_runs_from_the_config(tmp_path):
    """configs/grpo_vl_vgr_cpu.yaml on tools/make_tiny_vl_run.py's model and data, 2 steps."""
    import json
    from pathlib import Path

    from megatron_rl.trainer.main import train_main
    from tools.make_tiny_vl_run import main as make_run

    make_run(["--model-dir", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"), "--n-train", "8"])
    config = Path(__file__).resolve().parents[2] / "configs" / "grpo_vl_vgr_cpu.yaml"
    run_dir = tmp_path / "run"
    assert train_main(str(config), [f"model.path={tmp_path / 'model'}", f"logging.run_dir={run_dir}",
                                    f"data.train_files=[{tmp_path / 'data' / 'train.jsonl'}]",
                                    f"data.val_files=[{tmp_path / 'data' / 'val.jsonl'}]", "data.train_batch_size=4",
                                    "rollout.n=2", "trainer.total_steps=2", "trainer.val_before_train=false",
                                    "trainer.val_every=0", "logging.sinks=[jsonl]"]) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["token_weights/context_frac"] < 1 and r["token_weights/mean"] == pytest.approx(1.0, abs=0.05)
        assert 0 <= r["reward/mean"] <= 1
