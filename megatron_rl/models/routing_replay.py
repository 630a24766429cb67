"""MoE routing replay (`model.moe.routing_replay: true`): the trainer's forwards use the
experts the behaviour policy picked.

MoE RL drifts when the router of the training forward picks other experts than the rollout
engine did for the same tokens (near-tie router logits flip under the smallest numerical
difference, and a flipped expert changes the token's log-prob by far more than the noise).
Megatron-Core 0.16.1 has the mechanism (`moe_enable_routing_replay`: every `TopKRouter` owns
a `RouterReplay` whose action is RECORD, REPLAY_FORWARD or none, consulted by
`moe_utils.topk_routing_with_score_function`); this module drives it per model, through each
router's own instance (never Megatron's global list, which also holds the reference's routers).

Where the ids are recorded: the native engine's generation (prefill + every decode step,
`RoutingRecorder`); vLLM's (0.26, `enable_return_routed_experts`, mapped by
`rollout/vllm_convert.py`); when the engine's output carries none (the agent loop's
multi-turn traces) the actor's old-log-prob recompute records them and only the update
replays. The ids ride in the batch as two int16 tensors aligned with the tokens,
`prompt_routed_experts` `[B, P, L, k]` (left-padded like the prompt) and
`response_routed_experts` `[B, R, L, k]`: L is the model's MoE layers in global order (each
pipeline stage reads its own layers' slots), k the router's top-k, and a value is
`expert id + 1`: 0 means "not recorded" (padding, the last sampled token, which the engine
never feeds), so `Batch.concat`'s zero padding stays correct. Unrecorded tokens are routed to
experts 0..k-1 during replay; they score nothing (padding keys are masked, the last token's
output is never used).

Metrics of the replayed passes (`collect(kind)`): `moe/replay_mismatch_frac`, the fraction
of recorded tokens whose routing without replay (the router's own top-k of the same logits)
differs from the recorded one in at least one MoE layer, and `moe/replay_agree_frac`, the
fraction whose routing actually used (the router's routing map) equals the recorded one in
every layer (1.0 when replay works); measured on the old-log-prob recompute
(`kind="logprob"`) and, as `moe/replay_update_*`, on the update's forwards (`kind="update"`:
how far the updated policy's own routing has drifted from the recorded one).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

PROMPT_KEY = "prompt_routed_experts"
RESPONSE_KEY = "response_routed_experts"
PASS_KINDS = {"logprob": "moe/replay_", "update": "moe/replay_update_"}    # measured pass -> metric prefix


def moe_layer_slots(config) -> dict[int, int]:
    """Global layer index -> slot in the L dimension (MoE layers only, in order)."""
    pattern = config.moe_layer_freq
    layers = [i for i, s in enumerate(pattern) if s] if isinstance(pattern, list) else list(range(config.num_layers))
    return {layer: slot for slot, layer in enumerate(layers)}


def _routers(module) -> list:
    from megatron.core.transformer.moe.router import TopKRouter
    return [m for m in module.modules() if isinstance(m, TopKRouter) and m.router_replay is not None]


def _replay_enabled(chunks) -> bool:
    return bool(chunks[0].arch.is_moe and getattr(chunks[0].config, "moe_enable_routing_replay", False))


def _set_action(routers, action) -> None:
    for r in routers:
        r.router_replay.clear_indices()
        if action is None:
            r.router_replay.clear_router_replay_action()
        else:
            r.router_replay.set_router_replay_action(action)


def routed_experts(batch) -> torch.Tensor | None:
    """`[B, P+R, L, k]` (expert id + 1, 0 = not recorded) aligned with `prompt ++ response`, or None."""
    if PROMPT_KEY not in batch:
        return None
    return torch.cat([batch[PROMPT_KEY], batch[RESPONSE_KEY]], 1)


def set_routed_experts(batch, full: torch.Tensor) -> None:
    p = batch["prompt_ids"].shape[1]
    batch[PROMPT_KEY] = full[:, :p].to(torch.int16).contiguous()
    batch[RESPONSE_KEY] = full[:, p:].to(torch.int16).contiguous()


def token_positions(mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) in the batch's `[B, P+R]` layout of every token a router of this
    micro-batch's forward sees, in the router's order (-1 rows: filler). Padded micro-batches
    are `[b, s]` and Megatron routes `[s, b]` flattened (s-major); packed ones one stream."""
    if "packed" in mb:
        pk = mb["packed"]
        return pk.rows, pk.cols
    b, s = mb["input_ids"].shape
    rows = torch.where(mb["row_valid"] > 0, mb["batch_rows"], torch.full_like(mb["batch_rows"], -1))
    dev = rows.device
    return rows[None, :].expand(s, b).reshape(-1), torch.arange(s, device=dev)[:, None].expand(s, b).reshape(-1)


def _sum_over_pp(t: torch.Tensor) -> torch.Tensor:
    """Each pipeline stage filled its own layers' slots (zeros elsewhere): their sum is the whole."""
    from megatron.core import parallel_state as mpu
    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return t
    out = t.to(torch.int32)
    dist.all_reduce(out, group=mpu.get_pipeline_model_parallel_group())
    return out


class RoutingReplay:
    """The actor's routers and the replay/record passes over them (`Policy.routing_replay`)."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.config = chunks[0].config
        self.slots = moe_layer_slots(self.config)
        self.topk = self.config.moe_router_topk
        self.routers = [r for c in chunks for r in _routers(c)]
        self._by_module: dict[int, list] = {}
        self._pass: ReplayPass | None = None
        self._stats = {k: torch.zeros(3, dtype=torch.float64) for k in PASS_KINDS}   # tokens, mismatched, agreeing
        for r in self.routers:
            r.register_forward_hook(self._observe)

    @classmethod
    def attach(cls, chunks) -> "RoutingReplay | None":
        """None unless the model is MoE and was built with `model.moe.routing_replay`."""
        return cls(chunks) if _replay_enabled(chunks) else None

    def routers_of(self, module) -> list:
        key = id(module)
        if key not in self._by_module:
            self._by_module[key] = _routers(module)
        return self._by_module[key]

    def slot(self, router) -> int:
        return self.slots[router.layer_number - 1]

    @contextmanager
    def run(self, batch, *, record: bool, measure: str | None):
        """A pass over `batch`'s micro-batches: wrap the forward with `pass_.wrap(fn)`. With
        `record` the routers' own choices are written into `batch` at the end; otherwise the
        batch's recorded ids are forced (`KeyError` names the tensor when they are missing) and
        counted under `measure` (a `PASS_KINDS` name, or None)."""
        if measure is not None and measure not in PASS_KINDS:
            raise ValueError(f"RoutingReplay.run: measure={measure!r}, valid {list(PASS_KINDS)} or None")
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        full = None if record else routed_experts(batch)
        if not record and full is None:
            raise KeyError(f"model.moe.routing_replay: the batch has no '{PROMPT_KEY}' / '{RESPONSE_KEY}' "
                           "(neither the rollout engine nor the old-log-prob recompute recorded the routing)")
        s = batch["prompt_ids"].shape[1] + batch["response_ids"].shape[1]
        buf = torch.zeros(len(batch), s, len(self.slots), self.topk, dtype=torch.int16) if record else None
        self._pass = ReplayPass(self, full, buf, measure, len(batch), s)
        _set_action(self.routers, RouterReplayAction.RECORD if record else RouterReplayAction.REPLAY_FORWARD)
        try:
            yield self._pass
            if record:
                from megatron_rl.trainer.microbatch import model_inputs
                _, am = model_inputs(batch)
                whole = _sum_over_pp(buf) * am[:, :, None, None].to(torch.int32)
                set_routed_experts(batch, whole)
            elif measure:
                self._stats[measure] += self._pass.reduce_stats()
        finally:
            _set_action(self.routers, None)
            self._pass = None

    def _observe(self, router, inputs, output) -> None:
        p = self._pass
        if p is None or not p.measure or p.full is None or p.positions is None:
            return
        with torch.no_grad():
            logits = router.gating(inputs[0]).reshape(-1, router.config.num_moe_experts)
            natural = torch.zeros_like(output[1]).scatter(1, torch.topk(logits, self.topk, dim=1).indices, True)
            target = p.targets_for(router)                               # [N, k] long, -1 unrecorded
            recorded = (target >= 0).all(-1)
            wanted = torch.zeros_like(output[1]).scatter(1, target.clamp(min=0), True)
            p.note(recorded, (natural != wanted).any(-1), (output[1] == wanted).all(-1))

    def collect(self, kind: str = "logprob") -> dict[str, float]:
        """Metrics of the `kind` passes since the last call (already reduced over ranks); resets."""
        tokens, mism, agree = self._stats[kind].tolist()
        self._stats[kind].zero_()
        if not tokens:
            return {}
        prefix = PASS_KINDS[kind]
        return {f"{prefix}mismatch_frac": mism / tokens, f"{prefix}agree_frac": agree / tokens}


class ReplayPass:
    """One record or replay pass: per micro-batch targets in, recorded ids or statistics out."""

    def __init__(self, owner: RoutingReplay, full, buf, measure: bool, rows: int, cols: int):
        self.owner, self.full, self.buf, self.measure = owner, full, buf, measure
        self.positions = None
        self._targets: dict[int, torch.Tensor] = {}
        # per token of the batch: recorded (any layer seen), natural routing differs, used routing agrees
        self.flags = torch.zeros(3, rows, cols, dtype=torch.int32) if measure else None

    def wrap(self, forward):
        """`forward(model_chunk, mb)` with this pass's routing set before and read after."""
        def fwd(m, mb):
            routers = self.owner.routers_of(m)
            rows, cols = token_positions(mb)
            self.positions = (rows, cols)
            self._targets = {}
            if self.full is not None:
                for r in routers:        # unrecorded tokens go to experts 0..k-1 (they score nothing)
                    t = self.targets_for(r)
                    fill = torch.arange(t.shape[1], device=t.device).expand_as(t)
                    r.router_replay.set_target_indices(torch.where(t < 0, fill, t))
            out = forward(m, mb)
            if self.buf is not None:
                self._write_recorded(routers, rows, cols)
            self.positions = None
            return out
        return fwd

    def targets_for(self, router) -> torch.Tensor:
        """The recorded top-k `[N, k]` (long, -1 where unrecorded) of this micro-batch's tokens."""
        slot = self.owner.slot(router)
        if slot not in self._targets:
            rows, cols = self.positions
            ok = rows >= 0
            ids = self.full[rows.clamp(min=0).cpu(), cols.cpu(), slot].long() - 1          # [N, k]
            ids[~ok.cpu()] = -1
            ids[(ids < 0).any(-1)] = -1
            self._targets[slot] = ids.to(rows.device)
        return self._targets[slot]

    def _write_recorded(self, routers, rows, cols) -> None:
        ok = (rows >= 0).cpu()
        r_, c_ = rows.cpu()[ok], cols.cpu()[ok]
        for r in routers:
            ids = r.router_replay.get_recorded_indices()
            if ids is None:
                continue
            self.buf[r_, c_, self.owner.slot(r)] = (ids.detach().cpu()[ok] + 1).to(torch.int16)

    def note(self, recorded, mismatch, agree) -> None:
        rows, cols = self.positions
        ok = (rows >= 0) & recorded
        r_, c_ = rows[ok].cpu(), cols[ok].cpu()
        self.flags[0, r_, c_] = 1
        self.flags[1, r_, c_] |= mismatch[ok].cpu().int()
        # "agree" must hold in every layer: count disagreements, invert at the end
        self.flags[2, r_, c_] |= (~agree[ok]).cpu().int()

    def reduce_stats(self) -> torch.Tensor:
        """(recorded tokens, mismatched, agreeing) summed over DP/EP ranks; a token counts once
        over the pipeline stages (its layers live on several)."""
        from megatron.core import parallel_state as mpu

        flags = self.flags
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            flags = flags.clone()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=mpu.get_pipeline_model_parallel_group())
        seen = flags[0] > 0
        out = torch.tensor([float(seen.sum()), float((flags[1] > 0)[seen].sum()),
                            float((flags[2] == 0)[seen].sum())], dtype=torch.float64)
        if dist.is_initialized() and mpu.get_data_parallel_world_size() > 1:
            dist.all_reduce(out, group=mpu.get_data_parallel_group())
        return out


class RoutingRecorder:
    """The native engine's hook: records the routers' top-k in every forward of a generation
    chunk (prefill, each decode step, the re-prefill of a resumed partial rollout, which
    overwrites the positions it re-feeds: later tokens were sampled under that routing) and
    attaches them to the chunk's output batch. Buffers are keyed by the chunk's state object."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.slots = moe_layer_slots(chunks[0].config)
        self.topk = chunks[0].config.moe_router_topk
        self.routers = [r for c in chunks for r in _routers(c)]
        self._bufs: dict[int, torch.Tensor] = {}

    @classmethod
    def attach(cls, chunks) -> "RoutingRecorder | None":
        return cls(chunks) if _replay_enabled(chunks) else None

    def begin(self, chunk_state, batch_size: int, total_len: int) -> None:
        """Start (or, for a resumed chunk, continue) recording `chunk_state`'s forwards."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if id(chunk_state) not in self._bufs:
            self._bufs[id(chunk_state)] = torch.zeros(batch_size, total_len, len(self.slots), self.topk,
                                                      dtype=torch.int16)
        _set_action(self.routers, RouterReplayAction.RECORD)

    def after_forward(self, chunk_state, start: int, length: int) -> None:
        """The forward just run fed positions [start, start + length) of every row."""
        buf = self._bufs[id(chunk_state)]
        b = buf.shape[0]
        for r in self.routers:
            ids = r.router_replay.get_recorded_indices()
            if ids is None:
                continue
            ids = ids.detach().cpu().view(length, b, self.topk).transpose(0, 1)
            buf[:, start:start + length, self.slots[r.layer_number - 1]] = (ids + 1).to(torch.int16)
            r.router_replay.clear_indices()

    def end(self) -> None:
        _set_action(self.routers, None)

    def attach_to(self, chunk_state, out) -> None:
        """Write the chunk's recorded ids into `out` (prompt + response masks applied, PP stages summed)."""
        buf = self._bufs.pop(id(chunk_state))
        p, w = out["prompt_ids"].shape[1], out["response_ids"].shape[1]
        full = _sum_over_pp(buf[:, :p + w])
        am = torch.cat([out["prompt_mask"].long(), out["response_attention_mask"].long()], 1)
        set_routed_experts(out, full * am[:, :, None, None].to(full.dtype))


def replay_conflicts(cfg) -> str | None:
    """Why `model.moe.routing_replay` cannot work with this config (None when it can)."""
    m = cfg.model
    if not m.moe.routing_replay:
        return None
    if m.sequence_parallel and m.tp > 1:
        return ("model.moe.routing_replay with model.sequence_parallel=true: each TP rank's router sees "
                "only its slice of the sequence, which the recorded ids are not split by; set "
                "model.sequence_parallel=false")
    if m.recompute == "full":
        return ("model.moe.routing_replay with model.recompute=full: the router re-runs in the backward "
                "pass, where Megatron's replay target is the latest micro-batch's, not the recomputed one's; "
                "use model.recompute=selective or none")
    if cfg.agent.enable and cfg.rollout.logprob_mode == "rollout":
        return ("model.moe.routing_replay with agent.enable=true and rollout.logprob_mode=rollout: the agent "
                "loop's multi-turn traces carry no engine routing, so the old-log-prob recompute must record "
                "it; set rollout.logprob_mode=recompute")
    return None
