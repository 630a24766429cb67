"""The native rollout engine: batched generation with the Megatron actor itself.

Uses Megatron-Core's static KV cache (`StaticInferenceContext`): one prefill over the
left-padded prompts, then one token per step with an explicit key-padding mask (the
cache keeps the prompt padding, which must stay masked). Logits are gathered over TP;
under PP each step passes the hidden states stage to stage (point-to-point, in
Megatron's interleaved order under `model.vpp`: chunk 0 of every PP rank, then chunk 1,
...) and the last-position logits are broadcast from the last stage. One KV cache
serves every chunk (it is keyed by global layer number). Sampling is seeded per call,
so a resumed run draws the same tokens. `ignore_eos` runs every response to
`max_new_tokens`; `min_new_tokens` keeps EOS out of the draw (and stop strings unchecked)
before that many tokens.

Mixture-of-experts models under expert parallelism exchange tokens between the ranks of
the expert group (alltoall) in every forward, so those ranks must run the same number of
forwards: a rank whose responses are all done keeps stepping (feeding padding) until the
whole group is done (`_group_done`), and every rank must get the same number of chunks.

Partial rollouts (rollout/partial.py): `generate(..., budget=, interrupt=)` may stop between two
decode steps and return a `PartialRollout`; `resume(partial)` rebuilds the KV cache under the
current weights with one prefill and goes on. Every token carries the `policy_version` that
sampled it; with neither option the computation is the plain generate's, step for step.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from megatron_rl.data.batch import Batch
from megatron_rl.models.forward import causal_padding_mask
from megatron_rl.models.vl.rollout import rollout_inputs
from megatron_rl.parallel.context_parallel import whole_sequences
from megatron_rl.rollout.partial import ChunkState, Interrupt, PartialRollout, StopRule
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.sampling import sample_tokens


class NativeEngine:
    """`model`: one GPTModel or this rank's list of chunks (`model.vpp`), bare or wrapped."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 256, steering=None):
        from megatron_rl.models.loading import as_chunks

        self.model = model                  # as given (one model or the chunk list)
        self.chunks = as_chunks(model)
        self.core = self.chunks[0]
        self.arch = self.core.arch
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.steering = steering            # a steering controller or None
        self.eos_ids = eos_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.lockstep_group = lockstep_group(self.arch)
        self.policy_version = 0             # tags the tokens sampled from now on; the caller bumps it
        from megatron_rl.models.routing_replay import RoutingRecorder
        self.routing = RoutingRecorder.attach(self.chunks)   # model.moe.routing_replay: records top-k ids

    # --- protocol -------------------------------------------------------------------
    def generate(self, batch: Batch, sampling: SamplingParams, *, budget: int | None = None,
                 interrupt: Interrupt | None = None) -> Batch | PartialRollout:
        """The protocol's generate; with `budget` (decode steps) or `interrupt` (checked each
        step) it may stop early and return a `PartialRollout` to `resume` (rollout/partial.py)."""
        expanded = batch.repeat_interleave(sampling.n) if sampling.n > 1 else batch.select(range(len(batch)))
        for i, s in enumerate(expanded.samples):
            s.setdefault("group", s.get("uid", i // max(sampling.n, 1)))
        device = next(self.core.parameters()).device
        gen = torch.Generator(device=device).manual_seed(sampling.seed if sampling.seed is not None else 0)
        self._check_same_chunk_count(len(expanded), device)
        state = PartialRollout(sampling, gen.get_state(), pending=expanded.split(self.max_batch_size))
        return self._run(state, gen, StopRule(budget, interrupt, self._agree_stop))

    def resume(self, partial: PartialRollout, sampling: SamplingParams | None = None, *,
               budget: int | None = None, interrupt: Interrupt | None = None) -> Batch | PartialRollout:
        """Continue a stopped generation under the current weights and `policy_version`."""
        if sampling is not None and sampling != partial.sampling:
            raise ValueError(f"native engine resume: sampling {sampling} differs from the partial rollout's "
                             f"{partial.sampling}")
        device = next(self.core.parameters()).device
        gen = torch.Generator(device=device)
        gen.set_state(partial.generator_state)
        return self._run(partial, gen, StopRule(budget, interrupt, self._agree_stop))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The caller sets `policy_version` after an update (the tag of later tokens)."""
        from megatron_rl.rollout.weight_loader import load_named_hf_tensors
        load_named_hf_tensors(self.chunks, named_tensors)

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    # --- generation -----------------------------------------------------------------
    def _run(self, st: PartialRollout, gen: torch.Generator, rule: StopRule) -> Batch | PartialRollout:
        sp = st.sampling
        while st.current is not None or st.pending:
            if st.current is None:
                if rule.stop():                     # not a new chunk's prefill under stale weights
                    break
                st.current = ChunkState.empty(st.pending.pop(0), sp.max_new_tokens, self.pad_id)
            with whole_sequences(self.chunks):     # model.cp: each CP rank decodes whole rows (parallel/context_parallel.py)
                decoded = self._decode(st.current, sp, gen, rule)
            if not decoded:
                break
            st.finished.append(self._chunk_batch(st.current))
            st.current = None
        if st.current is not None or st.pending:
            st.generator_state = gen.get_state()
            return st
        return Batch.concat(st.finished, pad_values={"response_ids": self.pad_id, "policy_version": -1})

    @torch.no_grad()
    def _decode(self, cs: ChunkState, sp: SamplingParams, gen: torch.Generator, rule: StopRule) -> bool:
        """Decode `cs` from `cs.steps` on (one prefill of prompt ++ tokens so far first); True when
        the chunk is finished, False when `rule` stopped it between two steps."""
        from megatron.core.inference.contexts import StaticInferenceContext

        device = next(self.core.parameters()).device
        prompt_ids = cs.prompts["prompt_ids"].to(device)
        prompt_mask = cs.prompts["prompt_mask"].to(device)
        b, p = prompt_ids.shape
        t0 = cs.steps
        ctx = StaticInferenceContext(b, p + sp.max_new_tokens)
        was_training = self.core.training
        self._set_training(False)
        ids = torch.cat([prompt_ids, cs.tokens[:, :t0].to(device)], 1)
        kv_mask = torch.cat([prompt_mask, torch.ones(b, t0, dtype=prompt_mask.dtype, device=device)], 1)
        stop_texts = list(sp.stop or [])
        tokens, done = cs.tokens, cs.done
        if self.routing is not None:                        # model.moe.routing_replay
            self.routing.begin(cs, b, p + sp.max_new_tokens)
        try:
            self._set_steering_positions(cs.prompts, torch.arange(p + t0)[None].expand(b, -1) >= p)
            inputs = rollout_inputs(self.core, cs.prompts.samples, ids, kv_mask)   # images, M-RoPE (models/vl)
            pos, model_kwargs = inputs.prefill()
            logits = self._step(ids, pos, causal_padding_mask(kv_mask), ctx, **model_kwargs)
            if self.routing is not None:
                self.routing.after_forward(cs, 0, p + t0)
            ctx.sequence_len_offset += p + t0
            for t in range(t0, sp.max_new_tokens):
                early = t < sp.min_new_tokens               # EOS suppressed, stop strings unchecked
                tok, lp = self._sample(logits, sp, gen, suppress=self.eos_ids if early else None)
                tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
                tokens[:, t] = tok
                cs.logprobs[:, t] = torch.where(done, torch.zeros_like(lp), lp)
                cs.versions[:, t] = torch.where(done, -1, self.policy_version)
                cs.lengths += (~done).long()
                if not sp.ignore_eos:
                    done |= torch.isin(tok, torch.tensor(self.eos_ids))
                if stop_texts and t + 1 >= sp.min_new_tokens:
                    done |= self._hit_stop(tokens[:, : t + 1], done, stop_texts)
                cs.steps = t + 1
                rule.steps += 1
                if t == sp.max_new_tokens - 1 or self._group_done(done, device):
                    return True
                if rule.stop():
                    return False
                kv_mask = torch.cat([kv_mask, torch.ones(b, 1, dtype=kv_mask.dtype, device=device)], 1)
                self._set_steering_positions(cs.prompts, torch.ones(b, 1, dtype=torch.bool))
                logits = self._step(tok[:, None].to(device), inputs.step(ctx.sequence_len_offset),
                                    ~kv_mask.bool()[:, None, None, :], ctx)
                if self.routing is not None:
                    self.routing.after_forward(cs, p + t, 1)        # fed response token t
                ctx.sequence_len_offset += 1
        finally:
            self._set_training(was_training)
            if self.routing is not None:
                self.routing.end()
        return True

    def _chunk_batch(self, cs: ChunkState) -> Batch:
        chunk, b = cs.prompts, len(cs.prompts)
        width = int(cs.lengths.max().item()) if b else 0
        mask = (torch.arange(width)[None] < cs.lengths[:, None]).float()
        out = Batch({"prompt_ids": chunk["prompt_ids"], "prompt_mask": chunk["prompt_mask"],
                     "response_ids": cs.tokens[:, :width], "response_mask": mask,
                     "response_attention_mask": mask.long(),
                     "rollout_logprob": cs.logprobs[:, :width] * mask,
                     "policy_version": torch.where(mask > 0, cs.versions[:, :width], -1)}, chunk.samples)
        for k, v in chunk.tensors.items():
            if k not in out.tensors and not k.startswith("response"):
                out[k] = v
        if self.routing is not None:
            self.routing.attach_to(cs, out)                # prompt_/response_routed_experts
        return out

    def _agree_stop(self, want: bool) -> bool:
        """Every rank of the model-parallel group (and of the expert lockstep group) stops together."""
        from megatron.core import parallel_state as mpu

        flag = torch.tensor([int(want)], dtype=torch.long, device=next(self.core.parameters()).device)
        for group in (mpu.get_model_parallel_group(), self.lockstep_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def _group_done(self, done: torch.Tensor, device) -> bool:
        """All of this rank's responses are done, and (under expert parallelism) every rank's."""
        if self.lockstep_group is None:
            return bool(done.all())
        pending = torch.tensor([int(not bool(done.all()))], dtype=torch.long, device=device)
        dist.all_reduce(pending, group=self.lockstep_group)
        return pending.item() == 0

    def _check_same_chunk_count(self, rows: int, device) -> None:
        """Under expert parallelism every rank of the group must generate as many chunks
        (of `max_batch_size` rows); else the alltoall of the extra chunks would wait forever."""
        if self.lockstep_group is None:
            return
        chunks = -(-rows // self.max_batch_size)
        both = torch.tensor([chunks, -chunks], dtype=torch.long, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.lockstep_group)
        if both[0].item() != -both[1].item():
            raise ValueError(f"native engine under model.ep > 1: ranks of the expert-parallel group have between "
                             f"{-both[1].item()} and {both[0].item()} chunks of max_batch_size={self.max_batch_size} "
                             f"rows (this rank: {rows} rows); every rank must generate the same number of rows")

    def _set_training(self, mode: bool) -> None:
        for c in self.chunks:
            c.train(mode)

    def _step(self, ids, pos, mask, ctx, **model_kwargs) -> torch.Tensor:
        """Last-position logits [B, V] (full vocabulary) on every rank; `model_kwargs`: the
        prefill's `images` for a vision-language model."""
        from megatron_rl.parallel import pp_size

        if pp_size() == 1:
            logits = self.core(ids, pos, mask, inference_context=ctx, runtime_gather_output=True, **model_kwargs)
            return logits[:, -1, : self.arch.vocab_size].float()
        return self._step_pipelined(ids, pos, mask, ctx, **model_kwargs)

    def _step_pipelined(self, ids, pos, mask, ctx, **model_kwargs) -> torch.Tensor:
        """One forward through every stage: virtual stage v*pp + r is chunk v of PP rank r,
        so rank r receives from rank r-1 (rank 0 from the last rank, for v > 0) and sends on."""
        from megatron.core import parallel_state as mpu

        group = mpu.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        pp, r = len(ranks), mpu.get_pipeline_model_parallel_rank()
        cfg = self.core.config
        b, s = ids.shape
        seq = s // cfg.tensor_model_parallel_size if cfg.sequence_parallel else s
        last = len(self.chunks) - 1
        out = None
        for v, chunk in enumerate(self.chunks):
            if v or r:
                hidden = torch.empty(seq, b, cfg.hidden_size, dtype=cfg.pipeline_dtype, device=ids.device)
                dist.recv(hidden, src=ranks[r - 1], group=group)      # ranks[-1] for r == 0
                chunk.set_input_tensor(hidden)
            out = chunk(ids, pos, mask, inference_context=ctx, runtime_gather_output=True, **model_kwargs)
            if v < last or r < pp - 1:
                dist.send(out.contiguous(), dst=ranks[(r + 1) % pp], group=group)
        if r == pp - 1:
            logits = out[:, -1, : self.arch.vocab_size].float().contiguous()
        else:
            logits = torch.empty(b, self.arch.vocab_size, device=ids.device)
        dist.broadcast(logits, src=ranks[-1], group=group)
        return logits

    def _sample(self, logits, sp, gen, suppress=None):
        """Sample on the logits' device (no per-step copy of [B, V] to the host)."""
        tok, lp = sample_tokens(logits, sp, gen, suppress=suppress)
        return tok.cpu(), lp.cpu()

    def _hit_stop(self, tokens: torch.Tensor, done: torch.Tensor, stops: list[str]) -> torch.Tensor:
        hit = torch.zeros(tokens.shape[0], dtype=torch.bool)
        for i in range(tokens.shape[0]):
            if done[i]:
                continue
            tail = self.tokenizer.decode(tokens[i, -16:].tolist(), skip_special_tokens=False)
            hit[i] = any(s in tail for s in stops)
        return hit

    def _set_steering_positions(self, chunk: Batch, is_generated: torch.Tensor) -> None:
        if self.steering is None:
            return
        self.steering.set_strengths(chunk["steer_strengths"] if "steer_strengths" in chunk else None)
        self.steering.set_positions(is_generated)


def lockstep_group(arch):
    """The process group whose ranks must run every forward together: Megatron's expert
    tensor x model parallel group (the token dispatcher's) for an MoE model spread over
    more than one rank of it, else None."""
    if arch is None or not getattr(arch, "is_moe", False):
        return None
    from megatron.core import parallel_state as mpu
    if mpu.get_expert_tensor_and_model_parallel_world_size() == 1:
        return None
    return mpu.get_expert_tensor_and_model_parallel_group()


def eos_token_ids(tokenizer) -> list[int]:
    ids = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, (list, tuple)):
        ids += list(eos)
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None) and tid not in ids:
            ids.append(tid)
    if not ids:
        raise ValueError("tokenizer has no eos_token_id: generation could never stop")
    return ids
