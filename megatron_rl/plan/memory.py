"""Per-GPU memory plan of an RL run: will this config fit, and which TP/PP/recompute would.

Pure arithmetic on the model shape and the resolved `RunPlan` (no torch, no trainer
imports), so it runs on a laptop for a 70B plan. Every term is bytes on the worst GPU:

- actor weights:   params of the pipeline stage / TP, in the model dtype;
- gradients:       Megatron DDP's main-grad buffer, fp32 with grad_reduce_in_fp32
                   (the default here for bf16), else the param dtype;
- optimizer:       fp32 master copy + Adam m, v = 12 B/param for bf16 params (8 B for
                   fp32 params: no master copy), divided by DP under the distributed
                   optimizer (Megatron-LM's `docs/distrib_optimizer.md` table: 6 + 12/DP);
- activations:     Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
                   Transformer Models"), per layer and micro-batch
                   s*b*h*(34 + 5*a*s/h) bytes; `selective` drops the 5as/h term (so does
                   flash attention, which never stores the scores); `full` keeps 2*s*b*h per
                   layer plus one layer's working set during its recompute. Divided by TP
                   with sequence parallel (else 10sbh stays replicated). The first PP stage
                   holds min(PP, micro-batches) micro-batches in flight under 1F1B, times
                   (1 + (PP-1)/(PP*VPP)) when interleaved. The 34 is generalised to GQA and
                   SwiGLU shapes (`layer_activation_bytes`), reducing to 34 for MHA + 4h GeLU;
- logits:          `[tokens, vocab/TP]` of one micro-batch on the last stage: 2 B/elem
                   with the fused log-prob kernel (bf16 logits, gradient written in place;
                   x2 for micro-batches > 1, whose [s,b,v] -> [b,s,v] transpose copies),
                   +4 +4 (fp32 log-softmax and its gradient) unfused (the loss path
                   follows the plan's loss backend: torch -> unfused, else fused);
- grad transient:  the largest weight's bf16 `.grad`, alive until DDP's hook folds it into
                   the fp32 main grad (no gradient-accumulation fusion);
- reference, critic: weights (resident unless offloaded); the critic also grads + optimizer;
- reward model:    its own shape's weights (resident unless offloaded; a scalar head, no LM
                   head) and, in its own `reward` phase, one layer's forward working set of a
                   `reward.model.micro_batch_size` micro-batch (no-grad: layers do not pile up);
- rollout engine:  colocated vLLM reserves `gpu_memory_utilization` x GPU memory while it
                   generates (asleep during training); the native engine reuses the actor
                   and adds a KV cache of 2 * layers/PP * kv_heads/TP * head_dim * tokens * 2 B;
- context parallel (`cp`): every per-token term of the update and log-prob passes (activations,
                   logits, head inputs, MoE dispatch, reward-model pass) counts seq/cp tokens;
                   the all-gather CP attention (sdpa) adds, per held layer, the gathered K and V
                   expanded to the query heads, 2 * s * b * heads/TP * head_dim * 2 B; optimizer
                   state shards over DP x CP; the rollout KV cache stays whole (the native
                   engine decodes whole rows on every CP rank);
- overhead:        CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation,
                   2.5 GiB by default; not part of `torch.cuda.max_memory_allocated()`.

- mixture of experts: expert weights per GPU (experts / EP, each / ETP), their grads, and
                   optimizer state sharded over the expert-DP group; routed activations
                   with top-k and the alltoall dispatcher's buffers (plan/moe_memory.py).

Phases do not overlap: the peak is max(train, logprob, rollout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from megatron_rl.plan import moe_memory as moe
from megatron_rl.plan import vision_memory as vis
from megatron_rl.plan.shapes import PRESETS, Shape, resolve_shape, shape_from_arch  # noqa: F401 (re-exported)

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
RECOMPUTE = ("none", "selective", "full")
LOSS_PATHS = ("unfused", "fused")     # actor.fused_loss off -> unfused (torch); auto/on -> fused


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass
class PlanInputs:
    shape: Shape
    gpus: int = 8
    gpu_mem_gib: float = 80.0
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1                        # context parallel: each rank holds seq/cp tokens of a sequence
    ep: int = 1                        # expert parallel (MoE shapes only)
    etp: int = 1                       # expert tensor parallel
    sequence_parallel: bool = False
    sp_supported: bool = True          # Megatron's torch norms (local/sdpa specs) refuse SP; TE allows it
    recompute: str = "none"            # none | selective | full
    dtype: str = "bfloat16"
    grad_fp32: bool = True             # Megatron DDP grad_reduce_in_fp32
    distributed_optimizer: bool = True
    micro_batch: int = 1               # samples per micro-batch
    seq_len: int = 1024                # tokens per sample (prompt + response)
    num_microbatches: int = 1          # per DP rank per optimizer step
    loss_path: str = "fused"           # unfused | fused
    flash_attention: bool = True       # TE / SDPA: no [s, s] scores stored
    fused_swiglu: bool = True          # local spec: silu(gate) stored as well
    dropout: bool = False              # our providers set dropout 0 (no masks)
    ref_resident: bool = False         # reference weights on the GPU through training
    ref_enable: bool = False
    critic_enable: bool = False        # critic or GAD discriminator (trained trunk)
    engine: str = "vllm"               # native | vllm
    colocate: bool = True
    gpu_memory_utilization: float = 0.5
    rollout_seqs: int = 1              # concurrent sequences per DP rank (native engine KV)
    rollout_offload: str = "none"      # actor.offload_during_rollout: none | state | state_and_weights
    overhead_gib: float = 2.5
    rm_shape: Shape | None = None      # reward model (reward.model.path), None: no reward model
    rm_resident: bool = False
    rm_micro_batch: int = 1
    vision_trainable: bool = False     # model.freeze_vision false (vision-language shapes)
    image_tokens: int = 0              # image-pad tokens per sample, worst case (plan/vision_memory.py)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp * self.cp)

    @property
    def seq_local(self) -> int:
        """Tokens of one sample on one rank (context parallelism splits the sequence)."""
        return -(-self.seq_len // self.cp)

    @property
    def expert_dp(self) -> int:
        return moe.expert_data_parallel(self.gpus, self.ep, self.etp, self.pp)

    def validate(self) -> None:
        s = self.shape
        if self.gpus % (self.tp * self.pp * self.cp):
            raise ValueError(f"gpus={self.gpus} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}")
        if s.num_kv_heads % self.tp:
            raise ValueError(f"num_kv_heads={s.num_kv_heads} is not divisible by tp={self.tp}")
        if (self.ep > 1 or self.etp > 1) and not s.is_moe:
            raise ValueError(f"ep={self.ep}, etp={self.etp}: the model is dense (no experts)")
        if s.is_moe and s.num_experts % self.ep:
            raise ValueError(f"num_experts={s.num_experts} is not divisible by ep={self.ep}")
        if self.gpus % (self.etp * self.ep * self.pp):
            raise ValueError(f"gpus={self.gpus} is not divisible by etp*ep*pp = {self.etp}*{self.ep}*{self.pp}")
        if s.num_layers % (self.pp * (self.vpp or 1)):
            raise ValueError(f"num_layers={s.num_layers} is not divisible by pp*vpp = {self.pp}*{self.vpp or 1}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.loss_path not in LOSS_PATHS:
            raise ValueError(f"loss_path must be one of {LOSS_PATHS}, got {self.loss_path!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")


def inputs_from_plan(plan, gpu_mem_gib: float = 80.0, **overrides) -> PlanInputs:
    """The planner's inputs from a resolved `RunPlan` (megatron_rl/plan/run_plan.py): layout,
    micro-batches per optimizer step, reference placement, loss path and engine come from the
    plan; only the model shape must be known (`plan.model.shape`)."""
    lay, b, m = plan.layout, plan.batch, plan.model
    if m.shape is None:
        raise ValueError(f"memory plan: the model shape is {m.shape_source}")
    if b.max_tokens_per_microbatch > 0:
        micro, seq = 1, b.max_tokens_per_microbatch
    else:
        micro, seq = b.micro_batch_size, b.max_sample_tokens
    ref = plan.role("reference") if plan.has_role("reference") else None
    kw = dict(
        shape=m.shape, gpus=lay.world_size, gpu_mem_gib=gpu_mem_gib, tp=lay.tp, pp=lay.pp, vpp=lay.vpp,
        cp=lay.cp, ep=lay.ep, etp=lay.etp,
        sequence_parallel=lay.sequence_parallel, sp_supported=m.layer_spec in ("auto", "te"),
        recompute=m.recompute, dtype=m.dtype, grad_fp32=True, distributed_optimizer=m.distributed_optimizer,
        micro_batch=micro, seq_len=seq, num_microbatches=max(1, b.microbatches_per_mini_batch),
        loss_path="unfused" if plan.loss_backend == "torch" else "fused",
        flash_attention=m.layer_spec != "local", fused_swiglu=m.layer_spec != "local",
        ref_enable=ref is not None, ref_resident=ref is not None and ref.placement == "gpu",
        critic_enable=plan.has_role("critic") or plan.has_role("discriminator"),
        engine=plan.rollout.engine, colocate=plan.rollout.placement == "colocated",
        gpu_memory_utilization=plan.rollout.gpu_memory_utilization or 0.0,
        rollout_seqs=plan.rollout.samples_per_dp_rank, rollout_offload=plan.rollout.offload_during_rollout,
        vision_trainable=not m.freeze_vision, image_tokens=m.image_tokens,
    )
    if plan.has_role("reward_model"):
        rm = plan.role("reward_model")
        if rm.shape is None:
            raise ValueError(f"memory plan: the reward model's shape is {rm.shape_source}")
        kw.update(rm_shape=rm.shape, rm_resident=rm.placement == "gpu", rm_micro_batch=rm.micro_batch_size)
    kw.update(overrides)
    return PlanInputs(**kw)


def rollout_resident(c: dict, p: PlanInputs) -> float:
    """The actor's (and critic's) bytes left on the GPU while the engine generates:
    `actor.offload_during_rollout` moves gradients + optimizer state (`state`) and also the
    weights (`state_and_weights`) to host memory for the rollout (models/offload.py)."""
    kept = c["actor weights"] + c["actor grads"] + c["optimizer"] + c["critic"]
    if p.rollout_offload in ("state", "state_and_weights"):
        kept -= c["actor grads"] + c["optimizer"]
    if p.rollout_offload == "state_and_weights":
        kept -= c["actor weights"]
    return kept


# ----------------------------------------------------------------------------------------------
# Parameters


def padded_vocab(vocab: int, tp: int) -> int:
    return ((vocab + tp - 1) // tp) * tp       # as models.provider.padded_vocab_size


def layer_params(s: Shape, tp: int, sparse: bool = False) -> int:
    """Parameters of one transformer layer on one TP rank (norms replicated), experts excluded:
    a `sparse` (MoE) layer has the replicated router instead of the dense MLP."""
    qkv_out = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    attn = s.hidden_size * qkv_out + s.num_heads * s.head_dim * s.hidden_size
    bias = qkv_out if s.qkv_bias else 0
    mlp = 0 if sparse else (3 if s.gated_mlp else 2) * s.hidden_size * s.ffn_hidden_size
    norms = 2 * s.hidden_size + (2 * s.head_dim if s.qk_layernorm else 0)
    return (attn + bias + mlp) // tp + norms + (moe.router_params(s) if sparse else 0)


def stage_layers(s: Shape, pp: int, stage: str, pp_rank: int | None = None) -> tuple[int, int]:
    """(dense, sparse) layer counts of one pipeline stage (`middle`: rank `pp_rank`, default 1)."""
    n = s.num_layers // pp
    rank = {"first": 0, "only": 0, "last": pp - 1}.get(stage, 1 if pp_rank is None else pp_rank)
    sparse = s.sparse_layers(rank * n, n)
    return n - sparse, sparse


def stage_params(s: Shape, tp: int, pp: int, stage: str, scalar_head: bool = False,
                 pp_rank: int | None = None) -> int:
    """Non-expert parameters on one GPU of the `first` or `last` pipeline stage (both when pp == 1).

    With tied embeddings and PP > 1 the last stage keeps its own copy of the embedding
    (Megatron all-reduces their gradients). `scalar_head`: a critic's value head
    replaces the LM head. Experts: `stage_expert_params`.
    """
    dense, sparse = stage_layers(s, pp, stage, pp_rank)
    n = layer_params(s, tp) * dense + layer_params(s, tp, sparse=True) * sparse
    emb = padded_vocab(s.vocab_size, tp) * s.hidden_size // tp
    first, last = stage in ("first", "only"), stage in ("last", "only")
    if first:
        n += emb + (s.vision.params if s.vision else 0)   # the vision tower lives with the embedding
    if last:
        n += s.hidden_size                                 # final norm
        if scalar_head:
            n += s.hidden_size
        elif not s.tie_word_embeddings or not first:
            n += emb
    return n


def stage_expert_params(s: Shape, ep: int, etp: int, pp: int, stage: str, pp_rank: int | None = None) -> int:
    """Expert parameters on one GPU of a pipeline stage (0 for dense shapes)."""
    return stage_layers(s, pp, stage, pp_rank)[1] * moe.expert_layer_params(s, ep, etp)


def total_params(s: Shape) -> int:
    return stage_params(s, 1, 1, "only") + stage_expert_params(s, 1, 1, 1, "only")


def active_params(s: Shape) -> int:
    """Parameters one token passes through (top-k of the experts)."""
    if not s.is_moe:
        return total_params(s)
    return total_params(s) - s.sparse_layers(0, s.num_layers) * 3 * s.hidden_size * s.moe_ffn_hidden_size * (
        s.num_experts - s.moe_top_k)


# ----------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(s: Shape, seq: int, micro: int, tp: int, sp: bool, *, scores: bool,
                           dropout: bool = True, fused_swiglu: bool = True, act_bytes: int = 2,
                           sparse: bool = False, etp: int = 1) -> float:
    """Bytes one transformer layer keeps for backward for one micro-batch (no recompute).

    Korthikanti's terms per token, generalised: replicated across TP unless sequence
    parallel are the two norm inputs, the QKV and MLP inputs (4 x 2h) and the two
    dropout masks (2 x h); split by TP are Q (2 a d), K and V (2 x 2 kv d), the
    attention output (2 a d), fc1's output (2 x ffn, x2 gated), the activation's output
    (2 ffn, + 2 ffn for an unfused SwiGLU) and the scores (5 a s: softmax, mask,
    dropout output; 2 a s without dropout). MHA, ffn = 4h, GeLU, dropout: 34 + 5as/h.
    A `sparse` (MoE) layer replaces the dense MLP terms by `moe_memory`'s router/expert terms.
    """
    h, a, kv, d, f = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.ffn_hidden_size
    u = act_bytes / 2                                   # the formula counts 16-bit activations
    replicated = u * 8 * h + (2 * h if dropout else 0)
    split = u * (2 * a * d + 4 * kv * d + 2 * a * d)
    if not sparse:
        split += u * 2 * f * (2 if s.gated_mlp else 1) + u * 2 * f
        if s.gated_mlp and not fused_swiglu:
            split += u * 2 * f
    if scores:
        split += (5 if dropout else 2 * u) * a * seq
    per_token = (replicated / tp if sp else replicated) + split / tp
    if sparse:
        per_token += moe.moe_layer_activation_per_token(s, tp, etp, sp, fused_swiglu=fused_swiglu, act_bytes=act_bytes)
    return per_token * seq * micro


def activation_bytes(p: PlanInputs, in_flight: int | None = None) -> float:
    """Activations held by the first pipeline stage at the peak of a 1F1B step
    (`in_flight`: micro-batches held; stage k of PP holds min(PP - k, micro-batches))."""
    s = p.shape
    ab = DTYPE_BYTES[p.dtype]
    sp = p.sequence_parallel and p.tp > 1
    kw = dict(dropout=p.dropout, fused_swiglu=p.fused_swiglu, act_bytes=ab, etp=p.etp)
    counts = dict(zip((False, True), stage_layers(s, p.pp, "first")))

    def layer(sparse: bool, scores: bool) -> float:
        return (layer_activation_bytes(s, p.seq_local, p.micro_batch, p.tp, sp, scores=scores, sparse=sparse, **kw)
                + cp_gathered_kv_bytes(p))

    if p.recompute == "full":
        held_layers = ab * p.seq_local * p.micro_batch * s.hidden_size / (p.tp if sp else 1) * sum(counts.values())
    else:
        scores = p.recompute == "none" and not p.flash_attention
        held_layers = sum(layer(sp_, scores) * n for sp_, n in counts.items())
    in_flight = min(p.pp, p.num_microbatches) if in_flight is None else in_flight
    interleave = 1 + (p.pp - 1) / (p.pp * p.vpp) if p.vpp and p.pp > 1 else 1.0
    held = held_layers * in_flight * interleave
    if p.recompute == "full":                           # the layer being recomputed in backward
        held += max(layer(sp_, not p.flash_attention) for sp_, n in counts.items() if n)
    return held


def cp_gathered_kv_bytes(p: PlanInputs) -> float:
    """One layer's K and V all-gathered over CP and expanded to the query heads (sdpa's CP attention
    saves them for backward); 0 at cp=1."""
    if p.cp == 1:
        return 0.0
    return 2 * p.seq_len * p.micro_batch * (p.shape.num_heads // p.tp) * p.shape.head_dim * DTYPE_BYTES[p.dtype]


def logits_bytes(p: PlanInputs, training: bool = True) -> float:
    """Logits of one micro-batch on the last stage plus the loss path's own buffers."""
    ab = DTYPE_BYTES[p.dtype]
    elems = p.seq_local * p.micro_batch * padded_vocab(p.shape.vocab_size, p.tp) / p.tp
    if p.loss_path == "fused":   # b > 1: GPTModel's [s,b,v] -> [b,s,v] transpose copies the logits once
        return elems * ab * (2 if p.micro_batch > 1 else 1)
    return elems * (ab + 4 + (4 if training else 0))


def kv_cache_bytes(s: Shape, tp: int, pp: int, tokens: int, act_bytes: int = 2) -> float:
    return 2 * (s.num_layers // pp) * (s.num_kv_heads // tp) * s.head_dim * tokens * act_bytes


def head_input_bytes(p: PlanInputs) -> float:
    """The final norm's input and the LM head's input (gathered over TP), kept for backward."""
    sp = p.sequence_parallel and p.tp > 1
    return p.seq_local * p.micro_batch * p.shape.hidden_size * DTYPE_BYTES[p.dtype] * (1 + (1 / p.tp if sp else 1))


def largest_param(s: Shape, tp: int, stage: str) -> int:
    """The biggest single weight on this GPU (its bf16 `.grad` exists for a moment before
    Megatron DDP's hook adds it into the fp32 main grad)."""
    big = 2 * s.ffn_hidden_size * s.hidden_size // tp if s.gated_mlp else s.ffn_hidden_size * s.hidden_size // tp
    if s.is_moe and s.sparse_layers(0, s.num_layers) == s.num_layers:    # no dense MLP anywhere
        big = max(2 * s.moe_ffn_hidden_size * s.hidden_size // tp, s.num_experts * s.hidden_size)
    if stage != "middle":
        big = max(big, padded_vocab(s.vocab_size, tp) * s.hidden_size // tp)
    return big


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    components: dict[str, float] = field(default_factory=dict)   # bytes on the worst GPU
    phases: dict[str, float] = field(default_factory=dict)       # bytes incl. overhead
    notes: list[str] = field(default_factory=list)
    stage: str = "only"                                          # first | last | only (PP=1)
    other_stages: dict[str, dict[str, float]] = field(default_factory=dict)   # stage -> phases

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def fits(self) -> bool:
        return self.peak <= self.inputs.gpu_mem_gib * GiB

    @property
    def train_allocated(self) -> float:
        """The train phase without overhead: what `torch.cuda.max_memory_allocated()` sees."""
        return self.phases["train"] - self.components["overhead"]


def _static(p: PlanInputs, stage: str) -> dict[str, float]:
    ab = DTYPE_BYTES[p.dtype]
    n = stage_params(p.shape, p.tp, p.pp, stage)
    e = stage_expert_params(p.shape, p.ep, p.etp, p.pp, stage)     # sharded over the expert-DP group
    grad_b = 4 if (p.grad_fp32 or ab == 4) else ab
    state_b = 8 if ab == 4 else 12
    dense_opt = state_b / (p.dp * p.cp if p.distributed_optimizer else 1)    # Megatron shards over DP x CP
    expert_opt = state_b / (p.expert_dp if p.distributed_optimizer else 1)
    fz = vis.frozen_vision_params(p.shape, stage, p.vision_trainable)       # no grads, no optimizer state
    out = {"actor weights": (n + e) * ab, "actor grads": (n + e - fz) * grad_b,
           "optimizer": (n - fz) * dense_opt + e * expert_opt}
    out["reference"] = (n + e) * ab if p.ref_enable else 0.0
    if p.critic_enable:
        c = stage_params(p.shape, p.tp, p.pp, stage, scalar_head=True)
        out["critic"] = (c + e) * (ab + grad_b) + c * dense_opt + e * expert_opt
    else:
        out["critic"] = 0.0
    out["reward model"] = stage_params(p.rm_shape, p.tp, p.pp, stage, scalar_head=True) * ab if p.rm_shape else 0.0
    return out


def estimate(p: PlanInputs) -> MemoryPlan:
    """The plan for the worse of the first and last pipeline stage."""
    p.validate()
    stages = ["only"] if p.pp == 1 else ["first", "last"]
    plans = [estimate_stage(p, st) for st in stages]
    worst = max(plans, key=lambda pl: pl.peak)
    worst.other_stages = {pl.stage: pl.phases for pl in plans if pl is not worst}
    return worst


def estimate_stage(p: PlanInputs, stage: str, pp_rank: int | None = None) -> MemoryPlan:
    """The plan of one GPU of pipeline stage `first`, `middle` (give `pp_rank`), `last` or `only`."""
    s = p.shape
    ab = DTYPE_BYTES[p.dtype]
    c = _static(p, stage)
    last = stage in ("last", "only")
    sp = p.sequence_parallel and p.tp > 1
    rank = {"first": 0, "only": 0, "last": p.pp - 1}.get(stage, pp_rank)
    if rank is None:
        raise ValueError("estimate_stage: a 'middle' stage needs pp_rank")
    act = activation_bytes(p, in_flight=min(p.pp - rank, p.num_microbatches))
    c["activations"] = act
    if s.vision is not None:
        first = stage in ("first", "only")
        c["vision activations"] = vis.vision_activation_bytes(s.vision, p.image_tokens, p.micro_batch, ab,
                                                              p.vision_trainable) if first else 0.0
    c["logits + loss"] = logits_bytes(p) + head_input_bytes(p) if last else 0.0
    c["grad transient"] = largest_param(s, p.tp, stage) * ab if (p.grad_fp32 and ab < 4) else 0.0
    c["moe dispatch"] = moe.dispatch_bytes(s, p.seq_local * p.micro_batch, p.tp, p.etp, ab)
    fwd_layer = cp_gathered_kv_bytes(p) + max(layer_activation_bytes(s, p.seq_local, p.micro_batch, p.tp, sp, scores=not p.flash_attention,
                                           dropout=p.dropout, fused_swiglu=p.fused_swiglu, act_bytes=ab,
                                           sparse=sparse, etp=p.etp) for sparse in (False, s.is_moe))
    logprob_work = fwd_layer + c["moe dispatch"] + (logits_bytes(p, training=False) if last else 0.0)
    notes = []
    if p.engine == "vllm" and p.colocate:
        engine = p.gpu_memory_utilization * p.gpu_mem_gib * GiB
        notes.append(f"rollout: colocated vLLM reserves gpu_memory_utilization={p.gpu_memory_utilization} "
                     "of the GPU while generating and sleeps during training")
    elif p.engine == "vllm":
        engine = 0.0
        need = total_params(s) * ab / p.tp + kv_cache_bytes(s, p.tp, 1, p.rollout_seqs * p.seq_len, ab)
        notes.append(f"rollout: vLLM on separate GPUs, about {need / GiB:.1f} GiB each at TP={p.tp}")
    else:
        tokens = p.rollout_seqs * p.seq_len
        engine = kv_cache_bytes(s, p.tp, p.pp, tokens, ab) + p.rollout_seqs * padded_vocab(s.vocab_size, p.tp) / p.tp * 4
        notes.append(f"rollout: native engine reuses the actor; KV cache for {p.rollout_seqs} sequences x "
                     f"{p.seq_len} tokens per DP rank")
    c["rollout engine"] = engine
    c["overhead"] = p.overhead_gib * GiB
    resident = c["actor weights"] + c["actor grads"] + c["optimizer"] + c["critic"]
    ref_res = c["reference"] if p.ref_resident else 0.0
    ref_res += c["reward model"] if p.rm_resident else 0.0     # both: weights on the GPU between passes
    phases = {
        "train": resident + ref_res + act + c["logits + loss"] + c["grad transient"] + c["moe dispatch"]
        + c.get("vision activations", 0.0) + c["overhead"],
        "logprob": resident + c["reference"] + logprob_work + c["overhead"],
        "rollout": rollout_resident(c, p) + ref_res + engine + c["overhead"],
    }
    if p.rm_shape is not None:
        rm_work = layer_activation_bytes(p.rm_shape, p.seq_local, p.rm_micro_batch, p.tp, sp,
                                         scores=not p.flash_attention, dropout=False, fused_swiglu=p.fused_swiglu,
                                         act_bytes=ab) + p.seq_local * p.rm_micro_batch * p.rm_shape.hidden_size * 4
        c["reward model pass"] = rm_work
        phases["reward"] = (resident + ref_res + (0.0 if p.rm_resident else c["reward model"]) + rm_work
                            + c["overhead"])
        if not p.rm_resident:
            notes.append("reward model: offloaded to CPU, on the GPU only for its scoring pass")
    if p.ref_enable and not p.ref_resident:
        notes.append("reference: offloaded to CPU, on the GPU only for its log-prob pass")
    notes.append(f"overhead: {p.overhead_gib} GiB for CUDA context, cuBLAS/NCCL workspaces and fragmentation "
                 "(not in torch.cuda.max_memory_allocated)")
    return MemoryPlan(p, c, phases, notes, stage)


# ----------------------------------------------------------------------------------------------
# Suggestions


def candidates(p: PlanInputs, gpus_per_node: int = 8):
    """Every TP in {1,2,4,8} (<= a node, dividing the KV heads), PP dividing the layers
    and the GPUs, recompute none/selective/full (selective only without flash attention,
    where it would equal none); cheapest first: smallest TP*PP, then
    less recompute, then smaller PP (pipeline bubbles), then smaller TP."""
    s = p.shape
    out = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or s.num_kv_heads % tp or p.gpus % tp:
            continue
        for pp in range(1, s.num_layers + 1):
            if s.num_layers % pp or p.gpus % (tp * pp * p.cp) or p.gpus % (p.etp * p.ep * pp):
                continue
            for rc in RECOMPUTE:
                if rc == "selective" and p.flash_attention:
                    continue                    # flash attention stores no scores: same as none
                vpp = p.vpp if (p.vpp and pp > 1 and s.num_layers % (pp * p.vpp) == 0) else None
                out.append(replace(p, tp=tp, pp=pp, vpp=vpp, recompute=rc,
                                   sequence_parallel=tp > 1 and p.sp_supported, num_microbatches=p.num_microbatches))
    order = {rc: i for i, rc in enumerate(RECOMPUTE)}
    out.sort(key=lambda q: (q.tp * q.pp, order[q.recompute], q.pp, q.tp))
    return out


def suggest(p: PlanInputs, limit: int = 3, gpus_per_node: int = 8) -> list[MemoryPlan]:
    """Plans that fit, cheapest first (see `candidates`); empty when nothing fits.

    Micro-batches per DP rank are rescaled with DP (the global batch stays the same)."""
    fits = []
    total_micro = p.num_microbatches * p.dp
    for q in candidates(p, gpus_per_node):
        q.num_microbatches = max(1, math.ceil(total_micro / q.dp))
        plan = estimate(q)
        if plan.fits:
            fits.append(plan)
            if len(fits) >= limit:
                break
    return fits


# ----------------------------------------------------------------------------------------------
# Printing


def layout(p: PlanInputs) -> str:
    vpp = f" VPP={p.vpp}" if p.vpp else ""
    sp = " SP" if p.sequence_parallel and p.tp > 1 else ""
    ep = f" EP={p.ep} ETP={p.etp}" if p.shape.is_moe else ""
    cp = f" CP={p.cp}" if p.cp > 1 else ""
    return f"TP={p.tp} PP={p.pp}{vpp}{cp}{ep} DP={p.dp}{sp} recompute={p.recompute}"


def format_plan(plan: MemoryPlan) -> str:
    p = plan.inputs
    s = p.shape
    experts = (f", {s.num_experts} experts top-{s.moe_top_k} (ffn {s.moe_ffn_hidden_size}), "
               f"{active_params(s) / 1e9:.2f}B active" if s.is_moe else "")
    lines = [f"model: {total_params(s) / 1e9:.2f}B params, {s.num_layers} layers, hidden {s.hidden_size}, "
             f"{s.num_heads} heads ({s.num_kv_heads} KV), ffn {s.ffn_hidden_size}, vocab {s.vocab_size}{experts}",
             f"layout: {layout(p)} on {p.gpus} GPUs x {p.gpu_mem_gib:g} GiB; {p.dtype}; "
             f"micro-batch {p.micro_batch} x {p.seq_len} tokens, {p.num_microbatches} micro-batches/step/rank; "
             f"loss path {p.loss_path}",
             f"worst GPU: pipeline stage '{plan.stage}'",
             "",
             f"| {'component':<16} | {'GiB':>8} |",
             f"|{'-' * 18}|{'-' * 10}|"]
    for name, b in plan.components.items():
        lines.append(f"| {name:<16} | {b / GiB:8.2f} |")
    lines.append("")
    for name, b in plan.phases.items():
        mark = "  <- peak" if name == plan.peak_phase else ""
        lines.append(f"phase {name:<8} {b / GiB:8.2f} GiB{mark}")
    for stage, phases in plan.other_stages.items():
        lines.append(f"(stage '{stage}': " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in phases.items()) + " GiB)")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"peak {plan.peak / GiB:.2f} GiB of {p.gpu_mem_gib:g} GiB: {verdict}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
