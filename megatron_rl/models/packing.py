"""Sequence packing for RL batches: no compute on padding.

RL rows are `[left-padded prompt | right-padded response]` padded to the longest
row, so with long-tailed response lengths most of a padded batch is padding. Here
the real tokens of several rows are concatenated into one `[1, T]` stream; each
sequence keeps its own positions (restarting at 0) and attends only within itself:

- specs that take Megatron's THD layout ("sdpa", "te") get `PackedSeqParams` with
  `cu_seqlens` (varlen flash attention, per-sequence RoPE);
- the "local" spec (no THD support) gets an equivalent block-diagonal causal mask
  `[1, 1, T, T]` (exact, but quadratic in T: keep its token budget small).

Micro-batches are formed by a token budget (first-fit decreasing) instead of a
fixed row count, after rows are split over data-parallel ranks with near-equal
token sums (`balance_across_dp`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Layer specs whose core attention accepts PackedSeqParams(qkv_format="thd").
THD_LAYER_SPECS = {"sdpa", "te"}


@dataclass
class PackedBatch:
    """Real tokens of rows of a padded `[B, S]` batch, concatenated into `[1, T]`.

    `rows`/`cols` give, for every packed token, its place in the padded batch
    (-1 for the trailing filler segment added by `pad_to`/`pad_to_multiple_of`).
    """
    input_ids: torch.Tensor      # [1, T] long
    position_ids: torch.Tensor   # [1, T] long, restarting at 0 per sequence
    cu_seqlens: torch.Tensor     # [n + 1] int32 segment boundaries (the filler is a segment)
    max_seqlen: int
    rows: torch.Tensor           # [T] long
    cols: torch.Tensor           # [T] long
    padded_shape: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.size(1)

    @property
    def num_real_tokens(self) -> int:
        return int((self.rows >= 0).sum())

    def to(self, device) -> "PackedBatch":
        return replace(self, **{k: getattr(self, k).to(device) for k in
                                ("input_ids", "position_ids", "cu_seqlens", "rows", "cols")})

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def attention_mask(self) -> torch.Tensor:
        """Block-diagonal causal mask `[1, 1, T, T]`, Megatron convention (True = masked)."""
        seg = self.segment_ids()
        t = self.num_tokens
        causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
        keep = causal & (seg[:, None] == seg[None, :])
        return (~keep)[None, None]

    def segment_ids(self) -> torch.Tensor:
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """A padded per-token tensor `[B, S, ...]` in packed layout `[1, T, ...]` (filler = 0)."""
        if tuple(x.shape[:2]) != self.padded_shape:
            raise ValueError(f"pack: tensor of shape {tuple(x.shape)} does not match the padded batch "
                             f"{self.padded_shape}")
        real = self.rows >= 0
        out = x.new_zeros((self.num_tokens,) + tuple(x.shape[2:]))
        out[real] = x[self.rows[real], self.cols[real]]
        return out[None]

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A packed per-token tensor `[1, T, ...]` (or `[T, ...]`) back to `[B, S, ...]`."""
        if x.dim() >= 2 and x.size(0) == 1 and x.size(1) == self.num_tokens:
            x = x[0]
        if x.size(0) != self.num_tokens:
            raise ValueError(f"unpack: tensor of shape {tuple(x.shape)} has no packed dimension "
                             f"of {self.num_tokens} tokens")
        real = self.rows >= 0
        out = x.new_full(self.padded_shape + tuple(x.shape[1:]), fill)
        out[self.rows[real], self.cols[real]] = x[real]
        return out

    def next_token_labels(self, ignore_index: int = 0) -> torch.Tensor:
        """`[1, T]`: the next token of the same sequence (`ignore_index` at each sequence's end).

        Log-probs computed from these labels unpack onto the predicting token's
        position, i.e. the padded convention `logits[:, t]` scores `input_ids[:, t + 1]`.
        """
        ids = self.input_ids[0]
        labels = torch.full_like(ids, ignore_index)
        labels[:-1] = ids[1:]
        ends = self.cu_seqlens[1:].long() - 1
        labels[ends] = ignore_index
        return labels[None]


def pack_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows=None, *,
                   pad_to: int | None = None, pad_to_multiple_of: int = 1, pad_id: int = 0,
                   seq_multiple: int = 1) -> PackedBatch:
    """Pack the real tokens (`attention_mask != 0`, in order) of `rows` of a padded batch.

    `pad_to` / `pad_to_multiple_of` append a filler segment so every stream has a fixed
    or aligned length (pipeline schedules need one shape; TP sequence parallelism needs
    T divisible by tp). `seq_multiple` pads each sequence's segment at its end (pad tokens,
    rows/cols -1) to a multiple of it: context parallelism splits every segment in 2*cp chunks.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"pack_sequences: input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must both be [B, S]")
    device = input_ids.device
    rows = list(range(input_ids.size(0))) if rows is None else [int(r) for r in rows]
    mask = attention_mask[rows].bool()
    lengths = mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError(f"pack_sequences: rows {[rows[i] for i in (lengths == 0).nonzero()[:, 0].tolist()]} "
                         "have no real tokens")
    r_local, cols = mask.nonzero(as_tuple=True)            # row-major: each row's tokens in order
    src_rows = torch.tensor(rows, device=device)[r_local]
    ids = input_ids[src_rows, cols]
    if seq_multiple > 1:
        ids, src_rows, cols, lengths = _pad_segments(ids, src_rows, cols, lengths, seq_multiple, pad_id)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(ids.numel(), device=device) - torch.repeat_interleave(starts, lengths)
    seg_lengths = lengths.tolist()
    total = ids.numel()
    target = max(total, pad_to or 0)
    target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    if pad_to is not None and total > pad_to:
        raise ValueError(f"pack_sequences: {total} real tokens exceed pad_to={pad_to}")
    fill = target - total
    if fill:
        ids = torch.cat([ids, ids.new_full((fill,), pad_id)])
        pos = torch.cat([pos, torch.arange(fill, device=device)])
        src_rows = torch.cat([src_rows, src_rows.new_full((fill,), -1)])
        cols = torch.cat([cols, cols.new_full((fill,), -1)])
        seg_lengths.append(fill)
    cu = torch.tensor([0] + seg_lengths, device=device).cumsum(0).to(torch.int32)
    return PackedBatch(input_ids=ids[None], position_ids=pos[None], cu_seqlens=cu, max_seqlen=max(seg_lengths),
                       rows=src_rows, cols=cols, padded_shape=tuple(input_ids.shape))


def _pad_segments(ids, src_rows, cols, lengths, multiple: int, pad_id: int):
    """Each segment of the packed `ids` followed by pad tokens up to a multiple of `multiple`."""
    padded = -(-lengths // multiple) * multiple
    starts = torch.cumsum(padded, 0) - padded
    where = torch.repeat_interleave(starts, lengths) + (
        torch.arange(ids.numel(), device=ids.device) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths,
                                                                               lengths))
    total = int(padded.sum())
    out_ids, out_rows, out_cols = ids.new_full((total,), pad_id), src_rows.new_full((total,), -1), cols.new_full((total,), -1)
    out_ids[where], out_rows[where], out_cols[where] = ids, src_rows, cols
    return out_ids, out_rows, out_cols, padded


def plan_microbatches(lengths, max_tokens_per_microbatch: int) -> list[list[int]]:
    """Index lists whose length sums stay within the budget (first-fit decreasing).

    Bins come out longest-first; indices inside a bin are in input order.
    """
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens_per_microbatch]
    if too_long:
        raise ValueError(f"plan_microbatches: sequences {too_long[:8]} (lengths {[lengths[i] for i in too_long[:8]]}) "
                         f"exceed max_tokens_per_microbatch={max_tokens_per_microbatch}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens_per_microbatch - lengths[i])
    return [sorted(b) for b in bins]


def balance_across_dp(lengths, dp_size: int, equal_counts: bool = False) -> list[list[int]]:
    """Split sample indices over `dp_size` ranks with near-equal token sums.

    Greedy longest-first onto the least-loaded rank (within 4/3 of optimal, usually
    within one short sequence). `equal_counts` also keeps the number of samples per
    rank equal (needed when len(lengths) is a multiple of dp_size and the caller
    requires fixed per-rank batch sizes).
    """
    lengths = [int(n) for n in lengths]
    if dp_size < 1:
        raise ValueError(f"balance_across_dp: dp_size must be >= 1, got {dp_size}")
    cap = -(-len(lengths) // dp_size) if equal_counts else None
    parts: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        open_ranks = [r for r in range(dp_size) if cap is None or len(parts[r]) < cap]
        r = min(open_ranks, key=lambda r: (load[r], len(parts[r])))
        parts[r].append(i)
        load[r] += lengths[i]
    return [sorted(p) for p in parts]


def packed_microbatches(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        max_tokens_per_microbatch: int, **pack_kwargs) -> list[PackedBatch]:
    """The rows of a padded batch as token-budgeted packed micro-batches."""
    lengths = attention_mask.bool().sum(-1).tolist()
    return [pack_sequences(input_ids, attention_mask, rows, **pack_kwargs)
            for rows in plan_microbatches(lengths, max_tokens_per_microbatch)]


def supports_thd(model) -> bool:
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "layer_spec_name", "local") in THD_LAYER_SPECS


def packed_forward(model, packed: PackedBatch, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Logits `[1, T, vocab/tp]` (or Megatron's per-token loss `[1, T]` given `labels`); under
    `model.cp > 1` this CP rank's `[1, T/cp, vocab/tp]` in `CPLayout.packed` order (no `labels`)."""
    from megatron_rl.parallel.context_parallel import cp_size

    if cp_size() > 1:
        return _context_parallel_packed_forward(model, packed, labels)
    if supports_thd(model):
        return model(packed.input_ids, packed.position_ids, None, labels=labels,
                     packed_seq_params=packed.packed_seq_params())
    return model(packed.input_ids, packed.position_ids, packed.attention_mask(), labels=labels)


def _context_parallel_packed_forward(model, packed: PackedBatch, labels) -> torch.Tensor:
    """THD under CP: every segment (a multiple of 2*cp long, `pack_sequences(seq_multiple=)`) split
    in Megatron's load-balanced layout; Megatron's THD RoPE and both specs' CP attention (sdpa:
    models/sdpa_attention.py, te: Transformer Engine's, GPU only) read the global `cu_seqlens`."""
    from megatron_rl.models.forward import spec_name
    from megatron_rl.parallel.context_parallel import CPLayout, cp_rank, cp_size

    spec = spec_name(model)
    if spec not in THD_LAYER_SPECS:
        raise ValueError(f"model.cp > 1 needs the sdpa or te layer spec (this model: {spec!r}, no THD attention)")
    if labels is not None:
        raise ValueError("packed_forward: labels (Megatron's own loss) are not supported under model.cp > 1")
    layout = CPLayout.packed(packed.cu_seqlens, cp_size(), cp_rank())
    params = packed.packed_seq_params()
    params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = packed.cu_seqlens
    return model(layout.shard(packed.input_ids), layout.shard(packed.position_ids), None, packed_seq_params=params)
