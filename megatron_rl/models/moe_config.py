"""`model.moe`: the training-time options of mixture-of-experts models.

The architecture (experts, top-k, which layers are sparse, how probabilities are
normalised) comes from the checkpoint's config.json; these are the knobs HF
inference does not have. Defaults reproduce HF inference exactly (no auxiliary
losses, dropless routing, float32 router).
"""
from __future__ import annotations

from dataclasses import dataclass

ROUTER_DTYPES = ("fp32", "fp64", "model")
DISPATCHERS = ("alltoall", "allgather")


@dataclass
class MoEConfig:
    aux_loss_coef: float = 0.0          # switch-style load-balancing loss (Megatron moe_aux_loss_coeff)
    z_loss_coef: float = 0.0            # router z-loss (Megatron moe_z_loss_coeff)
    router_dtype: str = "fp32"          # fp32 | fp64 | model (the parameter dtype)
    token_dispatcher: str = "alltoall"  # alltoall | allgather (both dropless)
    routing_replay: bool = False        # force the rollout's experts in training forwards (models/routing_replay.py)
    grouped_gemm: bool | str = "auto"   # auto (= layer_spec te) | true | false: TEGroupedMLP experts (models/moe.py)
    # DeepSeek-V3's aux-free expert bias (a buffer, never in the optimizer): Megatron's per-step
    # sign update in finalize_model_grads; 0 keeps the checkpoint's bias (rollout and training route alike).
    expert_bias_update_rate: float = 1e-3

    def __post_init__(self) -> None:
        if self.aux_loss_coef < 0:
            raise ValueError(f"model.moe.aux_loss_coef={self.aux_loss_coef}: must be >= 0")
        if self.z_loss_coef < 0:
            raise ValueError(f"model.moe.z_loss_coef={self.z_loss_coef}: must be >= 0")
        if self.expert_bias_update_rate < 0:
            raise ValueError(f"model.moe.expert_bias_update_rate={self.expert_bias_update_rate}: must be >= 0")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"model.moe.router_dtype={self.router_dtype!r}: valid {list(ROUTER_DTYPES)}")
        if self.token_dispatcher not in DISPATCHERS:
            raise ValueError(f"model.moe.token_dispatcher={self.token_dispatcher!r}: valid {list(DISPATCHERS)}")
        if isinstance(self.grouped_gemm, str) and self.grouped_gemm.lower() in ("true", "false"):
            self.grouped_gemm = self.grouped_gemm.lower() == "true"
        if not (isinstance(self.grouped_gemm, bool) or self.grouped_gemm == "auto"):
            raise ValueError(f"model.moe.grouped_gemm={self.grouped_gemm!r}: valid auto | true | false")
