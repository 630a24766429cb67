"""A trainable (or frozen) Megatron policy: log-prob computation and PPO/GSPO updates
through Megatron's schedules, DDP wrapper and optimizer.

With `max_tokens_per_microbatch > 0` (`actor.max_tokens_per_microbatch`) log-probs and the
update run on packed token-budget micro-batches (trainer/microbatch.py): no compute on
padding, and the same loss: padded and packed micro-batches both give per-token
log-probs/entropies in the `[n, R]` response layout (`_token_stats`), and one call of
`algos.actor_loss` with `AlgosConfig.actor_loss_kwargs()` aggregates them (PPO and GSPO alike).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_rl.algos import actor_loss
from megatron_rl.data.batch import Batch
from megatron_rl.kernels import token_logprob_entropy
from megatron_rl.models.forward import gpt_forward, vision_language_model
from megatron_rl.models.moe_metrics import MoEMetrics
from megatron_rl.models.offload import Offloadable, TrainingStateOffloader
from megatron_rl.models.packing import packed_forward
from megatron_rl.models.routing_replay import RoutingReplay
from megatron_rl.models.schedule import run_microbatches
from megatron_rl.trainer.microbatch import (make_microbatches, make_packed_microbatches, mask_padded_vocab,
                                            model_inputs, move_microbatch, response_logits, scatter_rows,
                                            trim_padding)
from megatron_rl.parallel.context_parallel import check_same_rows, cp_size
from megatron_rl.trainer.cp_tokens import cp_token_stats
from megatron_rl.parallel.pipeline import broadcast_from_last_stage, broadcast_metrics, tp_group
from megatron_rl.trainer.update_steps import minibatch_passes, optimizer_step, set_loss_scales, weighted_mean


class Policy(Offloadable):
    """`model` is one GPTModel or this rank's list of chunks (`model.vpp`: one per virtual
    pipeline stage, `models.loading.load_model_chunks`), `ddp_model` its DDP wrapper(s)
    (`trainer.ddp.wrap_ddp_chunks`); `optimizer`/`scheduler` None for frozen roles.
    `chunks` / `ddp_chunks` always hold lists; `model` / `ddp` name the single chunk and
    are refused under VPP. With VPP the loss runs on the last chunk of the last PP rank.
    `max_tokens_per_microbatch > 0` packs log-prob and update micro-batches by that token
    budget instead of `micro_batch_size` padded rows (module docstring)."""

    def __init__(self, model, *, micro_batch_size: int, temperature: float = 1.0, optimizer=None,
                 scheduler=None, ddp_model=None, fused_backend: str | None = None,
                 max_tokens_per_microbatch: int = 0, routing_replay: bool = False):
        if max_tokens_per_microbatch < 0:
            raise ValueError(f"actor.max_tokens_per_microbatch must be >= 0, got {max_tokens_per_microbatch}")
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.ddp_chunks = None if ddp_model is None else (
            list(ddp_model) if isinstance(ddp_model, (list, tuple)) else [ddp_model])
        if self.ddp_chunks is not None and len(self.ddp_chunks) != len(self.chunks):
            raise ValueError(f"Policy: {len(self.chunks)} model chunks but {len(self.ddp_chunks)} DDP wrappers")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.mbs = micro_batch_size
        self.temperature = temperature
        self.vocab_size = self.chunks[0].arch.vocab_size
        self.backend = fused_backend
        self.max_tokens = max_tokens_per_microbatch
        self.trim_padding = True  # padded log-prob/update micro-batches cut to their used columns (when safe)
        self.steering = None      # a SteeringController attached to this model, or None
        self.moe_metrics = MoEMetrics.attach(self.chunks)   # None for dense models (models/moe_metrics.py)
        # `model.moe.routing_replay` on the actor (the reference keeps its own routing): None when off
        self.routing_replay = RoutingReplay.attach(self.chunks) if routing_replay else None
        if routing_replay and self.routing_replay is None:
            raise ValueError("model.moe.routing_replay=true: the model was not built with it (a dense model, or "
                             "moe_enable_routing_replay off in its TransformerConfig)")

    def _forward(self, m, mb):
        """The model forward; under the same per-sample SAE steering as the rollout, so
        recomputed log-probs and the update see the behaviour policy (DESIGN.md)."""
        if "packed" in mb:       # steering here can only be the unsteered wrapper (_check_packable)
            if self.steering is None:
                return packed_forward(m, mb["packed"])
            with self.steering.use():
                return packed_forward(m, mb["packed"])
        if self.steering is None:
            return gpt_forward(m, mb["input_ids"], mb["attention_mask"], images=mb.get("images"))
        from megatron_rl.steering.controller import generated_positions

        b, s = mb["input_ids"].shape
        p = int(mb["prompt_len"])
        with self.steering.use(mb.get("steer_strengths"), generated_positions(p, s - p, b, mb["input_ids"].device)):
            return gpt_forward(m, mb["input_ids"], mb["attention_mask"], images=mb.get("images"))

    @property
    def model(self):
        """The single model chunk; under `model.vpp` use `chunks` (every chunk)."""
        return _single(self.chunks, "Policy.model")

    @property
    def ddp(self):
        """The single DDP wrapper (None for frozen roles); under `model.vpp` use `ddp_chunks`."""
        return None if self.ddp_chunks is None else _single(self.ddp_chunks, "Policy.ddp")

    def _forward_model(self) -> list:
        return self.ddp_chunks if self.ddp_chunks is not None else self.chunks

    def _set_training(self, mode: bool) -> None:
        for c in self.chunks:
            c.train(mode)

    def _device(self):
        return next(self.chunks[0].parameters()).device

    def _microbatches(self, batch: Batch) -> list[dict]:
        """Padded micro-batches of `micro_batch_size` rows (also GAD's layout)."""
        device = self._device()
        return [move_microbatch(mb, device) for mb in make_microbatches(batch, self.mbs)]

    def _train_microbatches(self, batch: Batch) -> list[dict]:
        """Micro-batches for log-probs and the update: packed by token budget when
        `max_tokens_per_microbatch > 0`, padded otherwise (cut to their used columns where
        `_can_trim`)."""
        cp = cp_size()
        if cp > 1:
            check_same_rows(model_inputs(batch)[0], "prompt + response tokens")
        if not self.max_tokens:
            mbs = self._microbatches(batch)
            return [trim_padding(mb) for mb in mbs] if self._can_trim(batch) else mbs
        self._check_packable(batch)
        from megatron.core import parallel_state as mpu

        pad_to, multiple = packed_shape(self.max_tokens, tp=mpu.get_tensor_model_parallel_world_size(),
                                        pp=mpu.get_pipeline_model_parallel_world_size(),
                                        sequence_parallel=getattr(self.chunks[0].config, "sequence_parallel", False),
                                        fp8=bool(getattr(self.chunks[0].config, "fp8", None)), cp=cp)
        device = self._device()
        return [move_microbatch(mb, device) for mb in
                make_packed_microbatches(batch, self.max_tokens, pad_to=pad_to, pad_to_multiple_of=multiple,
                                         seq_multiple=2 * cp)]

    def _can_trim(self, batch: Batch) -> bool:
        """Padded micro-batches may differ in shape only without pipelining; sequence/context
        parallelism and FP8 need aligned lengths; image prompts (M-RoPE, per-row image features),
        routing replay (recorded experts per padded column) and steering (per-column strengths)
        keep the batch's layout."""
        from megatron.core import parallel_state as mpu

        cfg = self.chunks[0].config
        return (self.trim_padding and mpu.get_pipeline_model_parallel_world_size() == 1
                and mpu.get_context_parallel_world_size() == 1
                and not getattr(cfg, "sequence_parallel", False) and not getattr(cfg, "fp8", None)
                and self.routing_replay is None and self.steering is None
                and vision_language_model(self.chunks[0]) is None and not any("images" in s for s in batch.samples))

    def _check_packable(self, batch: Batch) -> None:
        from megatron_rl.steering.rollout_is import UnsteeredTraining

        if vision_language_model(self.chunks[0]) is not None or any("images" in s for s in batch.samples):
            raise ValueError(
                "actor.max_tokens_per_microbatch > 0 (packed micro-batches) cannot be used with a vision-language "
                "model or image prompts: M-RoPE positions and image features are laid out per padded row. "
                "Set actor.max_tokens_per_microbatch=0.")

        if self.steering is not None and not isinstance(self.steering, UnsteeredTraining):
            raise ValueError(
                "actor.max_tokens_per_microbatch > 0 (packed micro-batches) cannot be combined with steered "
                "actor forwards (steering.enable=true, steering.logprob_mode=recompute): the SAE hook applies "
                "one strength row per batch row, and a packed stream holds several samples in one row. "
                "Set actor.max_tokens_per_microbatch=0, or steering.logprob_mode=rollout_is (unsteered "
                "actor forwards, which pack).")

    def _token_stats(self, output: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob, entropy) `[rows, R]` of a micro-batch's response tokens through the fused
        vocab-parallel kernel: for a padded micro-batch from its response logits, for a packed
        one from the scored stream positions only, scattered back to `[n, R]` (0 where unscored);
        under `model.cp > 1` from this CP rank's positions, gathered over CP (trainer/cp_tokens.py)."""
        if cp_size() > 1:
            return cp_token_stats(output, mb, self.vocab_size, self.temperature, self.backend)
        if "packed" not in mb:
            logits = response_logits(output, mb, self.vocab_size)
            return token_logprob_entropy(logits, mb["labels"], tp_group=tp_group(), temperature=self.temperature,
                                         backend=self.backend)
        logits = mask_padded_vocab(output[0, mb["score_pos"]], self.vocab_size)      # [K, V/tp]
        lp, ent = token_logprob_entropy(logits, mb["score_labels"], tp_group=tp_group(),
                                        temperature=self.temperature, backend=self.backend)
        return scatter_rows(lp, mb), scatter_rows(ent, mb)

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs [B, R] (and entropy) of the response tokens, on every rank."""
        was_training = self.chunks[0].training
        self._set_training(False)
        mbs = self._train_microbatches(batch)

        def loss_fn(mb, output):
            lp, ent = self._token_stats(output, mb)
            info = {"rows": mb["rows"].cpu()} if "packed" in mb else {}
            return output.sum() * 0, {**info, "logprob": lp.float().cpu(), "entropy": ent.float().cpu()}

        with self._replayed(batch, record_if_missing=True) as forward:
            res = run_microbatches(self._forward_model(), mbs, forward, loss_fn, forward_only=True)
        self._set_training(was_training)
        n, r = len(batch), batch["response_ids"].shape[1]
        lp = _batch_rows(res, "logprob", n, r) if res else None
        ent = _batch_rows(res, "entropy", n, r) if res else None
        lp = broadcast_from_last_stage(lp, (n, r))
        ent = broadcast_from_last_stage(ent, (n, r)) if with_entropy else None
        return lp * batch["response_mask"].float(), ent

    def update(self, batch: Batch, algos, *, mini_batch_size: int, ppo_epochs: int,
               use_ref: bool, seed: int) -> list[dict[str, float]]:
        """PPO/GSPO epochs over shuffled mini-batches; returns one metrics dict per optimizer step."""
        if self.optimizer is None:
            raise RuntimeError("update() on a frozen policy")
        self._set_training(True)
        return minibatch_passes(batch, mini_batch_size, ppo_epochs, seed,
                                lambda mini: self._optimizer_step(mini, algos, use_ref))

    def sft_step(self, batch: Batch, lr: float | None = None) -> dict[str, float]:
        """One optimizer step on the token-mean NLL (temperature 1) of `batch`'s response tokens
        (GAD's supervised warm-up on teacher responses). `lr` overrides the LR for this step
        and leaves the schedule where it is; without it the schedule steps."""
        if self.optimizer is None:
            raise RuntimeError("sft_step() on a frozen policy")
        if cp_size() > 1:
            raise ValueError("sft_step (GAD's warm-up) does not cover model.cp > 1 (the run plan refuses gad.enable "
                             "with it); set model.cp=1")
        mbs = self._microbatches(batch)
        total = float(sum(mb["response_mask"].sum() for mb in mbs)) or 1.0

        def loss_fn(mb, output):
            logits = response_logits(output, mb, self.vocab_size)
            lp, _ = token_logprob_entropy(logits, mb["labels"], tp_group=tp_group(), temperature=1.0,
                                          backend=self.backend)
            nll = -(lp * mb["response_mask"]).sum() / total
            return nll * len(mbs), {"nll": float(nll.detach())}   # the schedule divides by len(mbs)

        self._set_training(True)
        groups = self.optimizer.param_groups
        old_lrs = [g["lr"] for g in groups]
        if lr is not None:
            for g in groups:
                g["lr"] = lr
        res, step = optimizer_step(self.ddp_chunks, self.optimizer, None if lr is not None else self.scheduler,
                                   mbs, self._forward, loss_fn, before_step=self.finish_onload)
        if lr is not None:
            for g, old in zip(groups, old_lrs):
                g["lr"] = old
        return broadcast_metrics({"actor/sft_loss": sum(r["nll"] for r in res),
                                  "actor/grad_norm": step["grad_norm"], "actor/update_ok": step["update_ok"]})

    # --- role lifecycle (trainer/roles.py): checkpoints through trainer/checkpoint.py ----
    def onload(self):
        """The training state back on the device for the update. The optimizer state (fp32
        master params, Adam moments) comes back on a side CUDA stream while the update's
        forward/backward run: `finish_onload` waits for it right before the optimizer step,
        and before anything else here reads the optimizer (checkpoints, state dicts)."""
        if isinstance(self.offloader, TrainingStateOffloader):
            return self.offloader.onload(overlap_optimizer=True)
        return super().onload()

    def finish_onload(self) -> None:
        """Wait for an overlapped optimizer-state onload (no-op when none is pending)."""
        if self.offloader is not None:
            self.offloader.finish_onload()

    def onload_metrics(self) -> dict[str, float]:
        """`perf/onload_overlapped_s` (copy time hidden behind the update) and `perf/onload_wait_s`
        (the stall before the optimizer step) of the last overlapped onload; {} on CPU or none."""
        stats = self.offloader.overlap_stats() if self.offloader is not None else None
        if stats is None:
            return {}
        return {"perf/onload_overlapped_s": stats.overlapped_s, "perf/onload_wait_s": stats.wait_s,
                "perf/onload_copy_s": stats.copy_s}

    def state_dict(self) -> dict:
        self.finish_onload()
        sds = [c.state_dict() for c in self.chunks]
        state = {"model": sds[0] if len(sds) == 1 else sds}
        if self.optimizer is not None:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        sds = state["model"] if isinstance(state["model"], list) else [state["model"]]
        if len(sds) != len(self.chunks):
            raise ValueError(f"Policy.load_state_dict: state holds {len(sds)} model chunks, this layout "
                             f"{len(self.chunks)} (model.vpp differs; resume through the dist-checkpoint)")
        self.finish_onload()
        for c, sd in zip(self.chunks, sds):
            c.load_state_dict(sd)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def save_checkpoint(self, ckpt_dir, name: str) -> None:
        from megatron_rl.trainer.checkpoint import save_policy
        self.finish_onload()
        save_policy(self, ckpt_dir)

    def load_checkpoint(self, ckpt_dir, name: str) -> None:
        from megatron_rl.trainer.checkpoint import load_policy
        self.finish_onload()
        load_policy(self, ckpt_dir)

    def _optimizer_step(self, mini: Batch, algos, use_ref: bool) -> dict[str, float]:
        mbs = self._train_microbatches(mini)
        set_loss_scales(mbs, algos.loss_agg_mode, algos.token_weights_apply_to)
        kl_coef = algos.kl_loss_coef if (algos.use_kl_loss and use_ref) else 0.0
        loss_kwargs = algos.actor_loss_kwargs()

        def loss_fn(mb, output):
            kwargs = loss_kwargs
            if kwargs["norm_len"] is None and "response_width" in mb:    # trimmed: Dr.GRPO divides by padded R
                kwargs = {**kwargs, "norm_len": int(mb["response_width"])}
            lp, ent = self._token_stats(output, mb)
            old = mb.get("old_logprob")        # None: on-policy, the old log-probs are this forward's (detached)
            ref = mb.get("ref_logprob") if kl_coef else None
            loss, metrics = actor_loss(
                lp.detach() if old is None else old.to(lp.dtype), lp, mb["advantages"].to(lp.dtype),
                mb["response_mask"], token_weights=mb.get("token_weights"),
                ref_logprob=None if ref is None else ref.to(lp.dtype), kl_coef=kl_coef, entropy=ent, **kwargs)
            info = {k: float(v) for k, v in metrics.items()}
            info["_w"] = float(mb["loss_scale"]) / len(mbs)
            return loss * mb["loss_scale"], info

        with self._replayed(mini, record_if_missing=False) as forward:
            res, step = optimizer_step(self.ddp_chunks, self.optimizer, self.scheduler, mbs, forward, loss_fn,
                                       before_step=self.finish_onload)
        return {**broadcast_metrics(weighted_mean(res)), **step}

    @contextmanager
    def _replayed(self, batch: Batch, *, record_if_missing: bool):
        """The forward of a log-prob or update pass: without `routing_replay`, `_forward`; with it,
        the batch's recorded experts forced (the log-prob pass also measures how many tokens the
        router would have routed otherwise), or, when the engine recorded none and this is the
        log-prob pass, the routers' own choices recorded into the batch for the update."""
        if self.routing_replay is None:
            yield self._forward
            return
        from megatron_rl.models.routing_replay import PROMPT_KEY
        record = record_if_missing and PROMPT_KEY not in batch
        measure = None if record else ("logprob" if record_if_missing else "update")
        with self.routing_replay.run(batch, record=record, measure=measure) as p:
            yield p.wrap(self._forward)


def _single(items: list, what: str):
    if len(items) != 1:
        raise ValueError(f"{what}: this rank holds {len(items)} model chunks (model.vpp={len(items)}); "
                         "use Policy.chunks / Policy.ddp_chunks, or set model.vpp=null")
    return items[0]


def packed_shape(max_tokens: int, *, tp: int, pp: int, sequence_parallel: bool,
                 fp8: bool = False, cp: int = 1) -> tuple[int | None, int]:
    """(pad_to, pad_to_multiple_of) for packed streams: sequence parallelism splits T over
    TP ranks (T % tp == 0); FP8 GEMMs need T % 16 (per TP rank under SP: models/fp8.py);
    context parallelism splits T in 2*cp chunks (T % 2cp, and T/cp % tp under SP);
    Megatron's pipeline schedule has fixed-size p2p buffers, so under PP > 1 every stream
    is padded to the (aligned) budget."""
    multiple = tp if (tp > 1 and sequence_parallel) else 1
    multiple *= 16 if fp8 else 1
    multiple *= 2 * cp if cp > 1 else 1
    pad_to = -(-max_tokens // multiple) * multiple if pp > 1 else None
    return pad_to, multiple


def _batch_rows(res: list[dict], key: str, n: int, r: int) -> torch.Tensor:
    """`[n, R]` from per-micro-batch results: packed ones name their rows, padded ones
    come in order (the last may carry filler rows)."""
    if "rows" not in res[0]:        # trimmed micro-batches (trim_padding) are narrower: pad back to R
        return torch.cat([torch.nn.functional.pad(x[key], (0, r - x[key].shape[1])) for x in res])[:n]
    out = torch.zeros(n, r)
    for x in res:
        out[x["rows"]] = x[key]
    return out
