"""The Trainer with `rollout.engine=vllm` end to end on CPU, vLLM replaced by a stand-in
that generates with a separate native-engine copy of the model and loads weights through
`apply_model`: the loop syncs after every update (weight_sync/* metrics), and the engine's
log-probs keep matching the updated actor's (rollout/logprob_diff ~ 0 on every step)."""
import json
import sys
import types

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import SamplingParams
from tests.trainer.conftest import tiny_run  # noqa: F401  (fixture)


class NativeBackedLLM:
    """Just enough of `vllm.LLM` for `VLLMEngine`, backed by a `NativeEngine` on its own model copy."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for p, sp in zip(prompts, params):
            kw = sp.kw
            ids = torch.tensor([p["prompt_token_ids"]])
            b = Batch({"prompt_ids": ids, "prompt_mask": torch.ones_like(ids)}, [{"uid": "x"}])
            r = self.engine.generate(b, SamplingParams(temperature=kw["temperature"] or 1.0, n=kw["n"],
                                                       greedy=kw["temperature"] == 0, seed=kw["seed"],
                                                       max_new_tokens=kw["max_tokens"]))
            comps = []
            for j in range(len(r)):
                keep = r["response_mask"][j] > 0
                toks, lps = r["response_ids"][j][keep].tolist(), r["rollout_logprob"][j][keep].tolist()
                comps.append(types.SimpleNamespace(index=j, token_ids=toks, finish_reason="stop",
                                                   logprobs=[{t: lp} for t, lp in zip(toks, lps)]))
            outs.append(types.SimpleNamespace(outputs=comps))
        return outs

    def apply_model(self, fn):
        return [fn(types.SimpleNamespace(load_weights=self._load_weights))]

    def _load_weights(self, named):
        """vLLM loads q/k/v (gate/up) parts one at a time; the native loader wants all parts of a
        fused parameter in one call, so parts are kept until a call completes every group."""
        from megatron_rl.rollout.weight_loader import load_named_hf_tensors

        self._pending = getattr(self, "_pending", {})
        self._pending.update({n: t.clone() for n, t in named})
        try:
            load_named_hf_tensors(self.engine.core, iter(self._pending.items()))
            self._pending.clear()
        except ValueError:      # an incomplete group: rewritten (idempotently) once its last part arrives
            pass

    def sleep(self, level):
        self.calls.append("sleep")

    def wake_up(self, tags=None):
        self.calls.append(f"wake:{','.join(tags or ['all'])}")

    def reset_prefix_cache(self):
        pass


def test_rollout_trainer_with_vllm_engine_syncs_every_step(tiny_run, monkeypatch):  # noqa: F811
    from megatron_rl.models import load_checkpoint
    from megatron_rl.rollout.native_engine import NativeEngine
    from megatron_rl.rollout.vllm_config import VLLMConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.trainer.main import train_main

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(kw=kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    built = {}

    def from_config(cls, cfg, tokenizer):
        copy = load_checkpoint(cfg.model.path, layer_spec="local")
        built["engine"] = VLLMEngine(NativeBackedLLM(NativeEngine(copy, tokenizer)), tokenizer,
                                     VLLMConfig(sleep_level=1), colocate=True, bucket_mb=0.01)
        return built["engine"]

    monkeypatch.setattr(VLLMEngine, "from_config", classmethod(from_config))
    import megatron_rl.plan as plan_pkg
    resolve = plan_pkg.resolve_plan          # the plan refuses vllm on cpu: plan as on a GPU, run on CPU
    monkeypatch.setattr(plan_pkg, "resolve_plan", lambda cfg, **kw: resolve(cfg, **{**kw, "device": "cuda"}))
    overrides, run_dir = tiny_run
    assert train_main(None, overrides + ["rollout.engine=vllm", "trainer.total_steps=2", "algos.entropy_coef=0.5",
                                            "actor.recompute_old_logprob=always",
                                            "rollout.engine_logprobs=always"]) == 0   # logs rollout/logprob_diff
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    for step in (1, 2):
        assert rows[step]["weight_sync/bytes"] > 0 and rows[step]["weight_sync/buckets"] > 1
        assert rows[step]["rollout/logprob_diff"] < 1e-4, rows[step]["rollout/logprob_diff"]
        assert "timing/weight_sync" in rows[step]
        assert all(rows[step][f"perf/vllm_{k}_s"] >= 0.0 for k in ("wake", "generate", "outputs", "sleep"))  # #20
    assert rows[1]["actor/grad_norm"] > 0               # entropy bonus: the actor changes even at zero reward
    calls = built["engine"].llm.calls
    # validation, step 1 rollout, sync after the update (weights only), step 2 rollout (KV cache)
    assert calls[:5] == ["sleep", "wake:all", "sleep", "wake:weights", "wake:kv_cache"]
