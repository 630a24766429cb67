"""Off-policy correction: the trainer's old log-probs against the behaviour policy's (rollout) ones.

Rollouts sampled by another policy than the one the trainer holds (an FP8 or bf16 inference
engine, an engine a policy version or more behind under async training, steered generation)
make the PPO ratio pi/pi_old blind to the gap pi_old/pi_behaviour. Per token, with the ratio

    rho_t = exp(old_logprob_t - rollout_logprob_t)      (level: token)
    rho_i = exp(mean_t (old - rollout))                 (level: sequence, the geometric mean, per row)

`algos.off_policy.correction` picks what the token weight becomes:

    tis   w = min(rho, cap)                      truncated importance sampling (verl's rollout_is
                                                 `truncate` mode; Yao et al. 2025, "off-policy RL")
    mis   w = 1 if low <= rho <= high else 0     masked IS: tokens (or rows) whose ratio leaves
                                                 `band` drop out; the rest keep weight 1
    none  no weight

The weight carries no gradient and is 0 on padding; the trainer folds it multiplicatively into
`batch["token_weights"]` (the existing float path, `algos.token_weights_apply_to` decides whether
it scales the pg term only or the loss mask). Library interface (torch only):

    w = off_policy_weights(cfg, old_logprob, rollout_logprob, mask)     # OffPolicyWeights
    w.weights [B, R] float32;  w.stats -> OffPolicyStats(weight_mean, weight_max, masked_frac,
                                                         truncated_frac, tokens)
    truncated_is_weights(old, rollout, mask, cap, level="token", key=...)   # also steering's rollout_is
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CORRECTIONS = ("none", "tis", "mis")
LEVELS = ("token", "sequence")
_MAX_LOG_RATIO = 20.0           # exp(20) ~ 5e8: no inf before the cap / band test


@dataclass
class OffPolicyConfig:
    # none | tis (truncated IS weight min(rho, cap)) | mis (mask tokens whose rho leaves band)
    correction: str = "none"
    cap: float = 2.0                                        # tis: truncate the weight at this value
    band: list[float] = field(default_factory=lambda: [0.5, 2.0])   # mis: keep low <= rho <= high
    level: str = "token"                                    # token | sequence (geometric-mean ratio per row)

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise ValueError(f"algos.off_policy.correction must be one of {'|'.join(CORRECTIONS)}, "
                             f"got {self.correction!r}")
        if self.level not in LEVELS:
            raise ValueError(f"algos.off_policy.level must be one of {'|'.join(LEVELS)}, got {self.level!r}")
        if not self.cap > 0:
            raise ValueError(f"algos.off_policy.cap must be > 0, got {self.cap}")
        band = list(self.band)
        if len(band) != 2 or not 0 <= band[0] < band[1]:
            raise ValueError(f"algos.off_policy.band must be [low, high] with 0 <= low < high, got {self.band}")
        self.band = [float(band[0]), float(band[1])]

    @property
    def enabled(self) -> bool:
        return self.correction != "none"


@dataclass(frozen=True)
class OffPolicyStats:
    """This rank's statistics over its `tokens` valid tokens (the caller makes them DP count-aware)."""
    weight_mean: float
    weight_max: float
    masked_frac: float          # mis: tokens whose weight is 0 because rho left the band
    truncated_frac: float       # tis: tokens whose rho exceeded the cap
    tokens: int


@dataclass(frozen=True)
class OffPolicyWeights:
    weights: torch.Tensor       # [B, R] float32, 0 on padding, no grad
    stats: OffPolicyStats


def importance_ratio(old_logprob: torch.Tensor, rollout_logprob: torch.Tensor, mask: torch.Tensor,
                     level: str = "token", key: str = "algos.off_policy") -> torch.Tensor:
    """`[B, R]` ratio exp(old - rollout) (level token) or each row's geometric-mean ratio broadcast
    over its tokens (level sequence); float32, detached; padding's value is meaningless."""
    if old_logprob.shape != rollout_logprob.shape or old_logprob.shape != mask.shape:
        raise ValueError(f"{key}: old_logprob {tuple(old_logprob.shape)}, rollout_logprob "
                         f"{tuple(rollout_logprob.shape)} and response_mask {tuple(mask.shape)} must match")
    if level not in LEVELS:
        raise ValueError(f"{key}.level must be one of {'|'.join(LEVELS)}, got {level!r}")
    m = mask.detach().float()
    log_ratio = (old_logprob.detach().float() - rollout_logprob.detach().float()) * (m > 0)
    if level == "sequence":
        seq = log_ratio.sum(-1, keepdim=True) / m.gt(0).sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq.expand_as(log_ratio)
    return torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))


def truncated_is_weights(old_logprob: torch.Tensor, rollout_logprob: torch.Tensor, mask: torch.Tensor,
                         cap: float, level: str = "token", key: str = "algos.off_policy.cap") -> torch.Tensor:
    """`[B, R]` weights `min(rho, cap) * mask` (float32, no grad); `key` names the cap in errors."""
    if not cap > 0:
        raise ValueError(f"{key} must be > 0, got {cap}")
    rho = importance_ratio(old_logprob, rollout_logprob, mask, level, key.rsplit(".", 1)[0])
    return rho.clamp(max=cap) * mask.float()


def band_mask_weights(old_logprob: torch.Tensor, rollout_logprob: torch.Tensor, mask: torch.Tensor,
                      band: tuple[float, float] | list[float], level: str = "token") -> torch.Tensor:
    """`[B, R]` weights 1 where low <= rho <= high, else 0, times `mask` (float32, no grad)."""
    low, high = float(band[0]), float(band[1])
    rho = importance_ratio(old_logprob, rollout_logprob, mask, level)
    return ((rho >= low) & (rho <= high)).float() * mask.float()


def off_policy_weights(cfg: OffPolicyConfig, old_logprob: torch.Tensor, rollout_logprob: torch.Tensor,
                       mask: torch.Tensor) -> OffPolicyWeights:
    """The correction `cfg` asks for (`correction: none` gives weights = mask) and its statistics."""
    m = mask.float()
    if cfg.correction == "tis":
        w = truncated_is_weights(old_logprob, rollout_logprob, mask, cfg.cap, cfg.level)
    elif cfg.correction == "mis":
        w = band_mask_weights(old_logprob, rollout_logprob, mask, cfg.band, cfg.level)
    else:
        w = m.clone()
    valid = m > 0
    n = int(valid.sum())
    rho = importance_ratio(old_logprob, rollout_logprob, mask, cfg.level)
    masked = float(((w == 0) & valid).sum()) / max(n, 1) if cfg.correction == "mis" else 0.0
    truncated = float(((rho > cfg.cap) & valid).sum()) / max(n, 1) if cfg.correction == "tis" else 0.0
    stats = OffPolicyStats(weight_mean=float(w[valid].mean()) if n else 0.0,
                           weight_max=float(w[valid].max()) if n else 0.0,
                           masked_frac=masked, truncated_frac=truncated, tokens=n)
    return OffPolicyWeights(w, stats)
