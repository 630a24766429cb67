"""Process bodies for the async tests (importable by spawned processes)."""
from __future__ import annotations


def train(rank, world, overrides):
    from megatron_rl.trainer.main import train_main
    assert train_main(None, list(overrides)) == 0


# --- partial rollouts at the worker level (tests/async_rl/test_partial_async.py) ------------------------
PAUSE_AT = 3        # the rollout rank holds decode step 3's interrupt check until a push is signalled


def partial_prompts():
    import torch

    from megatron_rl.data.batch import Batch

    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, :2] = 0
    return Batch({"prompt_ids": torch.randint(2, 90, (3, 5), generator=g) * mask, "prompt_mask": mask},
                 [{"uid": f"p{i}", "score": 0.1 * i, "turns": [{"role": "user"}]} for i in range(3)])


def partial_pair(rank, world, hf0, hf1, sampling, out_path):
    """Rank 0 plays trainer rank 0 (a `RolloutClient`), ranks 1.. the rollout ranks (`RolloutWorker`s over
    a native engine at TP = world - 1); one partial generate request, interrupted by a weight push at
    decode step PAUSE_AT."""
    from megatron_rl.async_rl.world import split_world
    from megatron_rl.parallel import init_distributed

    placement = split_world(world - 1, timeout_s=120)
    init_distributed(tp=1 if rank == 0 else world - 1, pp=1)
    if rank == 0:
        _trainer_side(placement.bridge, hf0, hf1, sampling, out_path)
    else:
        _rollout_side(placement.bridge, hf0)


def _trainer_side(bridge, hf0, hf1, sampling, out_path):
    import torch

    from megatron_rl.async_rl import codec
    from megatron_rl.async_rl.client import RolloutClient
    from megatron_rl.async_rl.messages import GenerateCmd
    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.rollout.weight_sync import iter_buckets
    from tests.async_rl.recompute import recomputed_logprobs

    v0, v1 = (load_checkpoint(h, layer_spec="local") for h in (hf0, hf1))
    buckets = list(iter_buckets(iter_hf_weights(v1), 1 << 16, device="cpu", reuse_buffer=False))   # several
    client = RolloutClient(bridge, weights_first=True)
    client.submit(GenerateCmd(1, partial_prompts(), sampling, 0, partial=True))
    bridge.store.wait(["test/paused"])              # the engine is between decode steps PAUSE_AT and +1
    client.push_weights(1, buckets)
    res = client.next_result({1})
    client.close()
    codec.save(res, out_path)
    torch.save({"lp0": recomputed_logprobs(v0, res.batch), "lp1": recomputed_logprobs(v1, res.batch),
                "buckets": len(buckets)}, out_path + ".lp")


def _rollout_side(bridge, hf0):
    import time
    import types

    from megatron_rl.async_rl.worker import RolloutWorker
    from megatron_rl.models import load_checkpoint
    from megatron_rl.rollout.native_engine import NativeEngine

    class PausingWorker(RolloutWorker):
        checks = 0

        def push_waiting(self) -> bool:
            self.checks += 1
            if self.checks == PAUSE_AT and self.bridge.rank == 1:      # the rank that reads the signal
                self.bridge.store.set("test/paused", "1")
                while not super().push_waiting():
                    time.sleep(0.01)
            return super().push_waiting()

    tok = types.SimpleNamespace(eos_token_id=1, pad_token_id=0)
    PausingWorker(NativeEngine(load_checkpoint(hf0, layer_spec="local"), tok), bridge).serve()
