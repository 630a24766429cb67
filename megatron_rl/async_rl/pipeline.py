"""The trainer ranks' view of the rollout ranks: prompt dispatch, the sample buffer, staleness,
weight pushes and validation generation (collective over the trainer world; only trainer rank 0
holds the client, the sampler position that matters and the buffer).

Admission: the request of step s is dispatched only once the weights of version s - 1 - lag are
queued (`pushed`), and none past the last step, so a sample trained at version v was generated at
version >= v - lag (lag: 0 sync, 1 one_step_off, max_staleness fully_async). Groups older than
that (possible after dynamic-sampling rounds) are dropped and counted (`async/dropped_stale`).
Buffer + checkpoint: `drain()` before a save waits for every in-flight request, so the sampler
position saved (every prompt dispatched) is that of the trained prompts plus the buffered ones,
and the buffer itself is saved with the checkpoint (`async_buffer.pt`, docs/ASYNC.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_rl.async_rl import codec
from megatron_rl.async_rl.messages import GenerateCmd, GenResult
from megatron_rl.data.batch import Batch
from megatron_rl.trainer.dynamic_sampling import groups_of

BUFFER_FILE = "async_buffer.pt"
SAMPLES_LOG = "async_samples.jsonl"


@dataclass
class Group:
    batch: Batch                # the rows of one prompt
    version: int                # the oldest policy version among its tokens (partial rollouts mix versions)
    request_id: int


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _broadcast(obj):
    """trainer rank 0's `obj` on every trainer rank."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RolloutPipeline:
    def __init__(self, cfg, plan, data, client, sampling_fn):
        self.cfg, self.data, self.client = cfg, data, client        # client: trainer rank 0 only
        self.lag, self.mode = plan.rollout.max_staleness, plan.rollout.async_mode
        self.sampling_fn = sampling_fn                              # (cfg, request index) -> SamplingParams
        self.groups_per_step = cfg.data.train_batch_size
        self.chunk_prompts = cfg.trainer.async_.request_prompts
        self.partial = cfg.trainer.async_.partial_rollout        # a queued push interrupts the engine
        self.buffer: list[Group] = []
        self.pending: dict[int, int] = {}       # request id -> groups not yet received
        self.dispatched = 0                     # training requests sent (request id = dispatch index)
        self.pushed = 0                         # the newest policy version queued to the rollout ranks
        self.dropped_total = 0
        self._val_id = 0
        self._since_take = {"generate_s": 0.0, "idle_s": 0.0, "interrupts": 0}

    # --- dispatch and receipt (trainer rank 0) ---------------------------------------------
    def dispatch(self) -> None:
        from megatron_rl.data.collate import collate_prompts

        idx = self.data.sampler.next_batch()
        prompts = collate_prompts([self.data.train[i] for i in idx], self.data.pad_id)
        self.dispatched += 1
        self.client.submit(GenerateCmd(self.dispatched, prompts, self.sampling_fn(self.cfg, self.dispatched),
                                       self.chunk_prompts, self.partial))
        self.pending[self.dispatched] = len(idx)

    def fill(self) -> None:
        """Dispatch the requests of steps up to `pushed + 1 + lag` (not past the last step)."""
        while self.dispatched < min(self.pushed + 1 + self.lag, self.cfg.trainer.total_steps):
            self.dispatch()

    def receive(self, res: GenResult) -> None:
        rows = groups_of(res.batch)
        oldest = res.batch.field("policy_version")           # per row: its oldest token's version
        self.buffer += [Group(res.batch.select(r), min(oldest[i] for i in r), res.request_id) for r in rows]
        self.pending[res.request_id] -= len(rows)
        if res.chunk == res.chunks - 1:
            self.pending.pop(res.request_id)
        self._since_take["generate_s"] += res.generate_s
        self._since_take["idle_s"] += res.idle_s
        self._since_take["interrupts"] += res.interrupts

    def drain(self) -> None:
        """Every in-flight request into the buffer (before a checkpoint)."""
        if self.client is None:
            return
        while self.pending:
            self.receive(self.client.next_result(set(self.pending)))

    # --- the step's batch (collective) -------------------------------------------------
    def take(self, step: int) -> tuple[Batch, dict[str, float]]:
        """The step's global batch of `groups_per_step` groups, each trainer rank's DP share."""
        payload = self._take_on_rank0(step) if _rank() == 0 else None
        batch, metrics = _broadcast(payload)
        return _dp_share(batch), metrics

    def _take_on_rank0(self, step: int):
        current = step - 1                       # the version this step's update starts from
        self.fill()
        t0 = time.perf_counter()
        dropped = 0
        while True:
            fresh = [g for g in self.buffer if g.version >= current - self.lag]
            dropped += len(self.buffer) - len(fresh)
            self.buffer = fresh
            if len(self.buffer) >= self.groups_per_step:
                break
            if not self.pending:
                self.dispatch()                  # dropped groups are replaced on demand
            self.receive(self.client.next_result(set(self.pending)))
        wait = time.perf_counter() - t0
        taken, self.buffer = self.buffer[:self.groups_per_step], self.buffer[self.groups_per_step:]
        self.dropped_total += dropped
        lags = [current - g.version for g in taken]
        gen, idle, interrupts = (self._since_take[k] for k in ("generate_s", "idle_s", "interrupts"))
        self._since_take = {"generate_s": 0.0, "idle_s": 0.0, "interrupts": 0}
        metrics = {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags)),
                   "async/dropped_stale": float(dropped), "async/dropped_stale_total": float(self.dropped_total),
                   "async/trainer_wait_s": wait, "async/rollout_wait_s": idle, "async/generate_s": gen,
                   "async/overlap_s": max(0.0, gen - wait), "async/buffered_groups": float(len(self.buffer))}
        if self.partial:
            metrics["async/interrupts"] = float(interrupts)
        batch = Batch.concat([g.batch for g in taken], pad_values={"prompt_ids": self.data.pad_id,
                                                                   "response_ids": self.data.pad_id,
                                                                   "policy_version": -1})
        metrics["async/token_staleness_mean"] = _token_staleness(batch, current)
        self._log_trained(step, taken)
        return batch, metrics

    def _log_trained(self, step: int, taken: list[Group]) -> None:
        """`RUN_DIR/async_samples.jsonl`: per step, the trained groups' uids and policy versions (a
        resumed run appends the steps it redoes; the last line of a step is the one that counts)."""
        import json

        rows = {"step": step, "uids": [g.batch.samples[0].get("uid") for g in taken],
                "versions": [g.version for g in taken]}
        with open(Path(self.cfg.logging.run_dir) / SAMPLES_LOG, "a") as f:
            f.write(json.dumps(rows) + "\n")

    # --- weights (collective) ------------------------------------------------------------
    def push_weights(self, actor, version: int, bucket_mb: float) -> dict[str, float]:
        """The actor's full HF-named weights (any TP/PP/VPP: every trainer rank joins the gather),
        packed on trainer rank 0 into host buckets the client thread broadcasts."""
        from megatron_rl.models.loading import iter_hf_weights
        from megatron_rl.rollout.weight_sync import iter_buckets

        t0 = time.perf_counter()
        named = iter_hf_weights(actor.chunks)
        if self.client is None:
            for _ in named:
                pass
            return {}
        buckets = list(iter_buckets(named, int(bucket_mb * 2 ** 20), device="cpu", reuse_buffer=False))
        self.client.push_weights(version, buckets)
        self.pushed = version
        self.fill()                              # what the new version admits starts generating now
        return {"async/weight_push_s": time.perf_counter() - t0 + self.client.last_push_s}

    # --- validation generation (collective) ------------------------------------------------
    def generate(self, prompts: Batch, sampling) -> Batch:
        """Each trainer rank's prompts, generated on the rollout ranks with the latest pushed weights."""
        from megatron_rl.parallel.data_parallel import dp_rank_size

        dp_rank, dp_size = dp_rank_size()
        gathered = [None] * _world() if _rank() == 0 else None
        mine = (dp_rank, prompts)
        if _world() > 1:
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        out = None
        if _rank() == 0:
            by_dp = {}
            for r, p in gathered:
                by_dp.setdefault(r, p)
            parts = [by_dp[r] for r in range(dp_size)]
            self._val_id -= 1
            self.client.submit(GenerateCmd(self._val_id, Batch.concat(parts, {"prompt_ids": self.data.pad_id}),
                                           sampling))
            res = self.client.next_result({self._val_id})
            rows, start = [], 0
            for p in parts:
                n = len(p) * sampling.n
                rows.append(list(range(start, start + n)))
                start += n
            out = (res.batch, rows)
        batch, rows = _broadcast(out)
        return batch.select(rows[dp_rank])

    # --- checkpoint: a role-like object with save/load_checkpoint ---------------------------
    def save_checkpoint(self, ckpt_dir: Path, name: str) -> None:
        if self.client is None:
            return
        if self.pending:
            raise RuntimeError("async buffer saved with requests in flight; call drain() first")
        codec.save({"buffer": [(g.batch, g.version, g.request_id) for g in self.buffer],
                    "dispatched": self.dispatched, "dropped_total": self.dropped_total}, Path(ckpt_dir) / BUFFER_FILE)

    def load_checkpoint(self, ckpt_dir: Path, name: str) -> None:
        if self.client is None:
            return
        state = codec.load(Path(ckpt_dir) / BUFFER_FILE)       # tensors + JSON: no pickled objects
        self.buffer = [Group(b, v, r) for b, v, r in state["buffer"]]
        self.dispatched, self.dropped_total = state["dispatched"], state["dropped_total"]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _token_staleness(batch: Batch, current: int) -> float:
    """Mean of (current - version that sampled it) over the batch's response tokens: below the
    sample-level staleness when partial rollouts sampled a sample's later tokens with newer weights."""
    v = batch["policy_version"]
    valid = (v >= 0) & (batch.get("response_attention_mask", batch["response_mask"]) > 0)
    return float((current - v[valid]).float().mean()) if valid.any() else 0.0


def _dp_share(batch: Batch) -> Batch:
    """This DP rank's contiguous share of the groups."""
    from megatron_rl.parallel.data_parallel import shard_for_dp

    groups = groups_of(batch)
    mine = shard_for_dp(groups, "data.train_batch_size")
    if len(mine) == len(groups):
        return batch
    return batch.select([i for rows in mine for i in rows])
