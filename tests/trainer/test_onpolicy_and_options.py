"""Throughput options of the GRPO step on a tiny float32 CPU run:
- the skipped old-log-prob pass (exactly on-policy) gives the same update as the separate pass;
- `actor.offload_during_rollout: state` frees the actor's grad buffers and optimizer state while the
  engine generates, and training after the round trips is bit-identical to without;
- the plan's decisions (old log-probs, offload defaults, distributed optimizer on CPU) and the
  logger's per-phase GPU-memory peak (a fake probe; nothing on CPU)."""
import json
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import tiny_run  # noqa: F401  (fixture)

QUIET = ["trainer.val_before_train=false", "trainer.final_validation=false", "trainer.save_final=false"]


def run(overrides, extra, engine_wrapper=None):
    """Build the GRPO trainer, optionally wrap its engine, fit; (final actor weights, metric rows)."""
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.main import build_trainer

    cfg = load_experiment_config(None, overrides + QUIET + extra)
    tr = build_trainer(cfg)
    if engine_wrapper is not None:
        tr.engine = engine_wrapper(tr, tr.engine)
    try:
        tr.fit()
    finally:
        tr.logger.close()
        tr.rewards.close()
    weights = {k: v.detach().clone() for k, v in tr.actor.model.state_dict().items()
               if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    rows = [json.loads(r) for r in Path(cfg.logging.run_dir, "metrics.jsonl").read_text().splitlines()]
    return tr, weights, rows


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_skipped_old_logprob_pass_gives_the_same_update(tiny_run, tmp_path):  # noqa: F811
    overrides, _ = tiny_run
    one = ["trainer.total_steps=1", "algos.entropy_coef=0.5"]         # the actor moves even at zero reward
    tr_skip, w_skip, rows_skip = run(overrides, one + [f"logging.run_dir={tmp_path / 'skip'}"])
    tr_pass, w_pass, rows_pass = run(overrides, one + ["actor.recompute_old_logprob=always",
                                                        f"logging.run_dir={tmp_path / 'pass'}"])
    assert tr_skip.plan.old_logprob.source == "update_forward" and tr_pass.plan.old_logprob.separate_pass
    assert "timing/logprob" not in rows_skip[-1] and rows_pass[-1]["timing/logprob"] > 0
    assert rows_skip[-1]["actor/grad_norm"] > 0
    d = max_diff(w_skip, w_pass)
    assert d <= 1e-6, d
    for k in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/pg_clipfrac"):
        assert rows_skip[-1][k] == pytest.approx(rows_pass[-1][k], abs=1e-6), k


class StateCheckingEngine:
    """Wraps the native engine: inside generate, records the bytes the actor's grad buffers and
    optimizer state hold (0 while offloaded)."""

    def __init__(self, tr, inner):
        self.tr, self.inner, self.seen = tr, inner, []

    def generate(self, batch, sampling):
        actor = self.tr.actor
        grads = sum(b.grad_data.untyped_storage().nbytes() for d in actor.ddp_chunks for b in d.buffers)
        opts = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
        opt = sum(v.untyped_storage().nbytes() for o in opts for s in o.optimizer.state.values()
                  for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        self.seen.append((grads, opt))
        return self.inner.generate(batch, sampling)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_offload_during_rollout_frees_state_and_trains_bit_identically(tiny_run, tmp_path):  # noqa: F811
    overrides, _ = tiny_run
    two = ["trainer.total_steps=2", "algos.entropy_coef=0.5"]
    tr_off, w_off, rows_off = run(overrides, two + ["actor.offload_during_rollout=state",
                                                    f"logging.run_dir={tmp_path / 'off'}"], StateCheckingEngine)
    tr_on, w_on, rows_on = run(overrides, two + [f"logging.run_dir={tmp_path / 'on'}"], StateCheckingEngine)
    assert tr_off.plan.rollout.offload_during_rollout == "state"
    assert tr_on.plan.rollout.offload_during_rollout == "none"              # native engine default
    assert all(g == 0 and o == 0 for g, o in tr_off.engine.seen), tr_off.engine.seen
    assert tr_on.engine.seen[0][0] > 0 and tr_on.engine.seen[1][1] > 0        # resident: grads; Adam after step 1
    assert rows_off[-1]["perf/offload_freed_gib"] > 0 and "timing/onload" in rows_off[-1]
    assert max_diff(w_off, w_on) == 0.0                                        # bit-identical
    for k in ("actor/pg_loss", "actor/grad_norm"):
        assert [r[k] for r in rows_off] == [r[k] for r in rows_on], k


def plan_of(*overrides, device="cpu"):
    from megatron_rl.config import load_experiment_config
    from megatron_rl.plan import resolve_plan

    cfg = load_experiment_config(None, ["model.path=none", "data.train_batch_size=4", "rollout.n=2",
                                        *overrides])
    return resolve_plan(cfg, world_size=1, device=device)


def test_plan_old_logprob_decisions():
    assert plan_of().old_logprob.source == "update_forward"
    assert "old log-probs" in plan_of().summary()
    for extra, why in ((["actor.mini_batch_size=4"], "2 optimizer steps"), (["actor.ppo_epochs=2"], "2 optimizer"),
                       (["algos.use_kl_in_reward=true"], "algos.use_kl_in_reward"),
                       (["actor.recompute_old_logprob=always"], "always")):
        p = plan_of(*extra)
        assert p.old_logprob.separate_pass and why in p.old_logprob.reason, (extra, p.old_logprob)
    assert plan_of("rollout.logprob_mode=rollout").old_logprob.source == "rollout"
    from megatron_rl.plan import PlanError
    with pytest.raises(PlanError, match="actor.recompute_old_logprob"):
        plan_of("actor.recompute_old_logprob=never")


def test_plan_offload_during_rollout_defaults_and_refusals():
    from megatron_rl.plan import PlanError

    assert plan_of().rollout.offload_during_rollout == "none"
    assert plan_of("rollout.engine=vllm", device="cuda").rollout.offload_during_rollout == "state"
    assert plan_of("rollout.engine=vllm", "actor.offload_during_rollout=state_and_weights",
                   device="cuda").rollout.offload_during_rollout == "state_and_weights"
    with pytest.raises(PlanError, match="actor.offload_during_rollout=state_and_weights with rollout.engine=native"):
        plan_of("actor.offload_during_rollout=state_and_weights")
    with pytest.raises(PlanError, match="actor.offload_during_rollout must be"):
        plan_of("actor.offload_during_rollout=all")


def test_distributed_optimizer_on_cpu_is_refused_by_the_plan():
    from megatron_rl.plan import PlanError

    with pytest.raises(PlanError, match=r"actor.optim.distributed_optimizer=true on cpu.*torch.cuda"):
        plan_of("actor.optim.distributed_optimizer=true")
    with pytest.raises(PlanError, match="critic.optim.distributed_optimizer"):
        plan_of("critic.enable=true", "algos.adv_estimator=gae", "critic.optim.distributed_optimizer=true")
    assert plan_of("actor.optim.distributed_optimizer=true", device="cuda").model.distributed_optimizer
    assert not plan_of().model.distributed_optimizer


class FakeProbe:
    def __init__(self):
        self.peaks, self.resets = iter([1.5, 3.0, 2.0]), 0

    def reset(self):
        self.resets += 1

    def peak_gib(self):
        return next(self.peaks)


def test_gpu_mem_peak_per_phase(tmp_path):
    from megatron_rl.logging import MetricsLogger
    from megatron_rl.logging.config import LoggingConfig

    logger = MetricsLogger(LoggingConfig(run_dir=str(tmp_path), sinks=[]), rank=0)
    with logger.timer("rollout"):
        pass
    assert not any(k.startswith("perf/gpu_mem") for k in logger.timings)      # CPU: not logged
    logger.memory_probe = probe = FakeProbe()
    for name in ("rollout", "update", "update"):
        with logger.timer(name):
            pass
    out = logger.log({}, step=1)
    assert probe.resets == 3
    assert out["perf/gpu_mem_peak_gib/rollout"] == 1.5 and out["perf/gpu_mem_peak_gib/update"] == 3.0  # max


def test_state_and_weights_offload_with_a_faked_vllm(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    """rollout.engine=vllm (vLLM faked as in tests/rollout/test_rollout_vllm_trainer.py, planned as on a GPU):
    the actor's weights are offloaded too while the engine generates; training matches `none` bit for bit."""
    import sys
    import types

    import megatron_rl.plan as plan_pkg
    from megatron_rl.models import load_checkpoint
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.vllm_config import VLLMConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from tests.rollout.test_rollout_vllm_trainer import NativeBackedLLM

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(kw=kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(VLLMEngine, "from_config", classmethod(lambda cls, cfg, tok: VLLMEngine(
        NativeBackedLLM(NativeEngine(load_checkpoint(cfg.model.path, layer_spec="local"), tok)), tok,
        VLLMConfig(sleep_level=1), colocate=True, bucket_mb=0.01)))
    resolve = plan_pkg.resolve_plan
    monkeypatch.setattr(plan_pkg, "resolve_plan", lambda cfg, **kw: resolve(cfg, **{**kw, "device": "cuda"}))

    class WeightChecking(StateCheckingEngine):
        def generate(self, batch, sampling):
            self.weights = getattr(self, "weights", []) + [
                sum(p.untyped_storage().nbytes() for p in self.tr.actor.model.parameters())]
            return super().generate(batch, sampling)

    overrides, _ = tiny_run
    two = overrides + ["rollout.engine=vllm", "trainer.total_steps=2", "algos.entropy_coef=0.5"]
    tr_w, w_w, _ = run(two, ["actor.offload_during_rollout=state_and_weights", f"logging.run_dir={tmp_path / 'w'}"],
                       WeightChecking)
    tr_n, w_n, _ = run(two, ["actor.offload_during_rollout=none", f"logging.run_dir={tmp_path / 'n'}"],
                       WeightChecking)
    assert tr_w.engine.weights == [0, 0] and all(g == 0 and o == 0 for g, o in tr_w.engine.seen)
    assert min(tr_n.engine.weights) > 0
    assert max_diff(w_w, w_n) == 0.0
