"""Context parallelism (`model.cp`): every sequence split over the CP ranks of a data-parallel rank.

Layout (Megatron's load balancing): a sequence of length L (a multiple of 2*cp) is cut into
2*cp chunks and CP rank r holds chunks r and 2cp-1-r, so each rank gets an equal share of
the causal attention work. Padded micro-batches `[b, s]` are split this way along s (s padded
on the right to a multiple of 2*cp); packed (THD) streams per sequence, each sequence padded
to a multiple of 2*cp (`packing.pack_sequences(seq_multiple=...)`), as Transformer Engine's
`thd_get_partitioned_indices` does. Megatron's RoPE slices its embedding the same way
(`get_pos_emb_on_this_cp_rank`, `_get_thd_freqs_on_this_cp_rank`).

What leaves the model is made whole again here: per-token results (log-probs, entropies,
values) are computed on the local tokens and all-gathered over CP back to the original
token order (`CPLayout.gather`), so everything downstream (loss aggregation, advantages,
metrics) runs unchanged and identically on every CP rank. Its backward keeps this rank's
slice of the (replicated) gradient; Megatron's schedule multiplies the loss by cp and its
DDP averages over DP x CP, which together give cp=1's gradient.

The sdpa spec's attention (models/sdpa_attention.py) all-gathers K and V over CP
(`all_gather_kv`: backward reduce-scatters dK/dV; Llama-3's all-gather CP, exact): padded
micro-batches with the causal + padding mask built here from global positions, packed ones
one lower-right-causal call per local chunk of each segment.
Nothing here runs at cp=1: callers test `cp_size() > 1` first.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


def cp_size() -> int:
    """Megatron's context-parallel world size (1 without distributed set-up)."""
    from megatron.core import parallel_state as mpu

    if not dist.is_initialized() or not mpu.model_parallel_is_initialized():
        return 1
    return mpu.get_context_parallel_world_size()


def cp_rank() -> int:
    from megatron.core import parallel_state as mpu
    return mpu.get_context_parallel_rank()


def cp_group():
    from megatron.core import parallel_state as mpu
    return mpu.get_context_parallel_group()


def chunk_positions(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions `[length // cp]` that CP rank `rank` holds of one sequence: chunks r and 2cp-1-r."""
    if length % (2 * cp):
        raise ValueError(f"context parallelism: sequence length {length} is not a multiple of 2 * model.cp = "
                         f"{2 * cp} (pad it first)")
    c = length // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)])


def thd_positions(cu_seqlens: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Stream positions CP rank `rank` holds of a packed stream: each segment split as `chunk_positions`."""
    bounds = cu_seqlens.tolist()
    return torch.cat([start + chunk_positions(end - start, cp, rank, device=cu_seqlens.device)
                      for start, end in zip(bounds[:-1], bounds[1:])])


@dataclass(frozen=True)
class CPLayout:
    """Where this rank's tokens sit in the whole sequence (or packed stream) of length `n`.

    `local[i]`: the global position of local token i; `gathered[j]`: the global position of slot j
    of a tensor all-gathered over CP (rank-major: rank 0's local tokens, then rank 1's, ...)."""
    n: int
    local: torch.Tensor        # [n // cp] long
    gathered: torch.Tensor     # [n] long, a permutation of arange(n)

    @classmethod
    def padded(cls, s: int, cp: int, rank: int, device=None) -> "CPLayout":
        return cls(s, chunk_positions(s, cp, rank, device),
                   torch.cat([chunk_positions(s, cp, r, device) for r in range(cp)]))

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, cp: int, rank: int) -> "CPLayout":
        return cls(int(cu_seqlens[-1]), thd_positions(cu_seqlens, cp, rank),
                   torch.cat([thd_positions(cu_seqlens, cp, r) for r in range(cp)]))

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor (`dim` of length n)."""
        return x.index_select(dim, self.local.to(x.device))

    def gather(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole-sequence tensor in the original order from every rank's local part
        (differentiable: backward keeps this rank's slice of the gradient, which every CP rank
        computes alike from the replicated downstream loss)."""
        full = _GatherSequence.apply(x_local, dim, cp_group())
        inverse = torch.empty_like(self.gathered)
        inverse[self.gathered] = torch.arange(self.n, device=self.gathered.device)
        return full.index_select(dim, inverse.to(full.device))


def gather_padded(x_local: torch.Tensor, s: int) -> torch.Tensor:
    """`[b, s]` from this rank's `[b, s'/cp]` share of a padded forward (s' = s rounded up to 2*cp)."""
    cp = cp_size()
    layout = CPLayout.padded(s + (-s % (2 * cp)), cp, cp_rank(), device=x_local.device)
    return layout.gather(x_local)[:, :s]


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    x = x.contiguous()                  # K/V may be strided views of the fused QKV projection
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim`; backward: this rank's slice (the downstream loss is replicated)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.rank, ctx.world = dim, dist.get_rank(group), dist.get_world_size(group)
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.world, ctx.dim)[ctx.rank].contiguous(), None, None


class _GatherKV(torch.autograd.Function):
    """All-gather K or V along the sequence `dim`; backward: reduce-scatter of the gradient
    (every rank's queries attend to every rank's keys)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        group, world = ctx.group, dist.get_world_size(ctx.group)
        parts = [p.contiguous() for p in grad.chunk(world, ctx.dim)]
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = torch.empty_like(parts[0])
            dist.reduce_scatter(out, parts, group=group)
            return out, None, None
        grad = grad.contiguous()                       # gloo has no reduce_scatter
        dist.all_reduce(grad, group=group)
        return grad.chunk(world, ctx.dim)[dist.get_rank(group)].contiguous(), None, None


def all_gather_kv(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """K or V of every CP rank, rank-major along `dim` (the order of `CPLayout.gathered`)."""
    return _GatherKV.apply(x, dim, cp_group())


def padded_attention_mask(attention_mask: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """`[b, 1, s/cp, s]` (True = masked) for local queries against the gathered keys: causal by
    global position, padded key columns masked, each query keeps its own column (as
    `forward.causal_padding_mask`, whose rows and columns these are)."""
    q, k = layout.local.to(attention_mask.device), layout.gathered.to(attention_mask.device)
    causal = k[None, :] <= q[:, None]
    keep = causal[None] & attention_mask.bool()[:, k][:, None, :]
    keep = keep | (k[None, :] == q[:, None])[None]
    return (~keep)[:, None]


def pad_sequence_dim(x: torch.Tensor, multiple: int, value: int = 0) -> torch.Tensor:
    """`x` `[b, s]` right-padded along s to a multiple of `multiple`."""
    extra = -x.size(1) % multiple
    return x if not extra else torch.nn.functional.pad(x, (0, extra), value=value)


@contextmanager
def whole_sequences(chunks):
    """Within the scope the model runs whole, unsplit sequences on every CP rank, with no CP
    collective: the native engine's KV-cache decoding (each CP rank of a DP rank decodes the same
    rows with the same seed, so they agree). Switched off for the scope: the sdpa attention's CP
    path (its `cp`), Megatron RoPE's per-rank slicing (its `cp_group` constructor attribute) and
    the config's `context_parallel_size` (the RoPE table length); RoPE's table cache is cleared
    on entry and exit. No-op at cp=1."""
    if cp_size() == 1:
        yield
        return
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    saved, configs = [], {}
    for chunk in chunks:
        for mod in chunk.modules():
            if hasattr(mod, "_context_parallel") and hasattr(mod, "cp"):       # models/sdpa_attention.SDPAttention
                saved.append((mod, "cp", mod.cp))
            elif isinstance(mod, RotaryEmbedding):
                saved.append((mod, "cp_group", mod.cp_group))
            cfg = getattr(mod, "config", None)
            if hasattr(cfg, "context_parallel_size"):
                configs[id(cfg)] = cfg
    saved += [(cfg, "context_parallel_size", cfg.context_parallel_size) for cfg in configs.values()]
    for obj, name, _ in saved:
        setattr(obj, name, None if name == "cp_group" else 1)
    # RotaryEmbedding.forward is lru_cache'd on (self, length, ...), not on cp_group: tables made
    # in either mode must not be served in the other
    RotaryEmbedding.forward.cache_clear()
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        RotaryEmbedding.forward.cache_clear()


def check_same_rows(tensor: torch.Tensor, what: str) -> None:
    """Every CP rank of a DP rank must hold the same rows (they split their tokens): compare a
    checksum over the CP group and refuse a mismatch (e.g. rollouts generated per rank)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else tensor.device
    x = tensor.to(device, torch.float64)                 # NCCL reduces device tensors only
    s = torch.stack([x.sum(), (x * torch.arange(1, x.numel() + 1, dtype=torch.float64,
                                                 device=device).reshape(x.shape)).sum()])
    group = cp_group()
    both = torch.cat([s, -s])                            # max and -min in one all-reduce
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:2], -both[2:]):
        raise RuntimeError(f"context parallelism (model.cp={dist.get_world_size(group)}): the CP ranks of one "
                           f"data-parallel rank hold different {what}; every CP rank must see the same batch "
                           "(identical rollouts: docs/run_plan.md, 'Context parallelism')")
