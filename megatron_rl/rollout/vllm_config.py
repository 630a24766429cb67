"""`VLLMConfig`: vLLM-specific settings, mounted as `rollout.vllm` in the root schema.

Keys shared with the native engine (n, temperature, stop, gpu_memory_utilization,
colocate, weight_sync_bucket_mb) stay in `RolloutConfig`; this section holds what
only the vLLM engine reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field


# vLLM's online FP8 (`vllm.LLM(quantization="fp8")`) replaces each linear weight after loading
# by an FP8, transposed copy plus scales (Fp8 `process_weights_after_loading`); a plain
# `model.load_weights` of bf16 tensors afterwards no longer fits those parameters (vLLM issues
# #17272, #28425). vLLM re-quantizes updates only inside its layerwise reload
# (`initialize_layerwise_reload` ... `finalize_layerwise_reload` around the whole update, PR #32133);
# megatron-rl's weight sync loads bucket by bucket without it, so the key is refused until the
# sync is wired to that path and measured.
QUANTIZATION_REFUSAL = ("not supported yet: vLLM's online FP8 weights are re-quantized on update only through its "
                        "layerwise reload (initialize/finalize_layerwise_reload around the whole sync), and the "
                        "weight sync loads bf16 buckets with plain model.load_weights; leave it empty (bf16 rollouts)")


@dataclass
class VLLMConfig:
    """Engine start-up (passed to `vllm.LLM`): tensor_parallel_size is vLLM's own TP,
    independent of the actor's; enforce_eager None (default) = CUDA graphs + torch.compile
    (False) unless clamp steering needs eager mode (forward hooks; CUDA graphs would skip
    hooks registered after capture); with False, additive steering is built into the model
    (steering/vllm_graph.py); dtype "" = the actor's `model.dtype`."""

    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None
    dtype: str = ""
    max_model_len: int = 0                  # 0: prompt + max_new_tokens of the rollout config, at least 512
    enable_prefix_caching: bool = True
    seed: int = 0
    distributed_executor_backend: str = ""  # "" = vLLM's choice; "external_launcher" for SPMD under torchrun
    extra_args: dict = field(default_factory=dict)   # any other vllm.LLM keyword (e.g. max_num_seqs)
    # "" (the actor's dtype) | fp8: refused for now (QUANTIZATION_REFUSAL says why)
    quantization: str = ""

    """Colocation: after each generate the engine sleeps (level 1 offloads weights to
    CPU and drops the KV cache; level 2 drops both, safe because the trainer syncs new
    weights before the next generate). 0 = never sleep."""

    sleep_level: int = 1

    """Torch's cached blocks before a wake (rollout/vllm_device.py): always (default) = emptied
    every time; auto = kept when vLLM's wake (what its last sleep freed) fits beside them with a
    margin, sparing the next update its allocator warm-up. Measured on one H200 (e2e bench,
    2026-12-01): no step-time gain outside noise (packed 7.06 s auto vs 7.13 s always, where auto
    had to release anyway), and kept blocks raise the peak (padded: 110 GiB), hence the default."""

    release_torch_cache: str = "always"

    """Sampling noise. True (default): one seed per prompt (`vllm_convert.request_seeds`, from
    the step's seed of this DP rank, trainer/phases.py `rollout_seed`): reproducible row by row,
    and measured no slower (one H200, vLLM 0.26, SmolLM2-1.7B shape, 64 prompts x 8 x 256
    tokens, `bash tools/gpu_session.sh e2e`, 2026-12-01: 4.77 s vs 4.89 s without log-probs,
    9.11 s vs 10.11 s with them; the per-sequence sampling loop vLLM runs for seeded requests
    stays hidden). False: no request seed, vLLM's engine generator: faster in no measured case,
    and not reproducible (the same batch under a re-seeded device generator drew other tokens)."""

    per_request_seed: bool = True

    """Log-probs: processed_logprobs = after temperature (and top-k/top-p, which the
    default rollout leaves off), the distribution the trainer recomputes."""

    logprobs_mode: str = "processed_logprobs"

    """Weight sync: colocated (in-process, or CUDA IPC to TP workers) | broadcast
    (NCCL to vLLM on separate GPUs: needs broadcast_host/port)."""

    transport: str = "colocated"
    broadcast_host: str = "127.0.0.1"
    broadcast_port: int = 0

    def __post_init__(self) -> None:
        if "quantization" in self.extra_args:
            raise ValueError("rollout.vllm.extra_args.quantization: use rollout.vllm.quantization (checked there)")
        if self.quantization:
            raise ValueError(f"rollout.vllm.quantization={self.quantization!r}: " + QUANTIZATION_REFUSAL)
        checks = [("sleep_level", self.sleep_level, (0, 1, 2)), ("release_torch_cache", self.release_torch_cache,
                                                                   ("auto", "always")),
                  ("logprobs_mode", self.logprobs_mode, ("raw_logprobs", "processed_logprobs")),
                  ("transport", self.transport, ("colocated", "broadcast"))]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"rollout.vllm.{key} must be one of {allowed}, got {value!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
