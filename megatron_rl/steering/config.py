"""`SteeringConfig`: the `steering:` YAML section (SAE-steered rollouts and the strength predictor)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PredictorConfig:
    """Strength predictor: a small MLP from a frozen-LLM prompt representation to per-feature
    strengths, trained with a GRPO-style policy gradient while the LLM stays frozen."""

    enable: bool = False
    repr: str = "mean"              # mean | last: pool prompt hidden states (mean over real tokens) or take the last one
    repr_layer: int = -1            # 0-indexed decoder layer whose output is the representation; -1 = the steering layer
    hidden: int = 256               # MLP hidden width
    min_strength: float = -10.0     # tanh bounds of the policy mean
    max_strength: float = 10.0
    init_std: float = 1.0           # Gaussian policy std at start
    learn_std: bool = True          # learn log-std per feature, else keep init_std fixed
    lr: float = 1e-3
    n_samples: int = 4              # strengths sampled per prompt (one GRPO group per prompt); = rollout.n
    compare_every: int = 1          # steps between steered-vs-unsteered greedy decodes of the step's
                                    # prompts (steering/reward_gain, frac_tokens_changed); 0 = never


@dataclass
class SteeringConfig:
    """Residual-stream steering after one decoder layer with an SAE in sae-lens format.

    mode: add (h + s*m*W_dec[f] per feature) | clamp (set SAE feature f to s*m, keep the
    reconstruction error) | direction_clamp (set the projection on the unit decoder row to s*m,
    no SAE encode) | global (add, every feature's s_i*m_i scaled by one per-sample strength).
    `strengths` are the defaults per feature; the predictor or the engine may override them per
    sample. logprob_mode: recompute = old log-probs recomputed under the same per-sample steering
    (steering is part of the behaviour policy); rollout_is = use the engine's log-probs with
    importance correction: old log-probs recomputed unsteered, and each token's policy-gradient
    term weighted by min(exp(old - rollout), rollout_is_cap) (docs/steering.md).
    """

    enable: bool = False
    sae_path: str = ""              # local sae-lens directory (cfg.json + sae_weights.safetensors) or a release id
    sae_id: str | None = None       # SAE id inside a release
    layer: int | None = None        # 0-indexed decoder layer; overrides the one parsed from the SAE's hook_name
    mode: str = "add"
    feature_idxs: list[int] = field(default_factory=list)
    max_activations: list[float] = field(default_factory=list)   # m_i; empty = 1.0 each
    strengths: list[float] = field(default_factory=list)         # s_i; empty = 1.0 each
    global_strength: float = 1.0    # mode=global: the one strength that scales every feature
    scope: str = "all"              # all | prompt | generated tokens
    logprob_mode: str = "recompute"  # recompute | rollout_is
    rollout_is_cap: float = 2.0     # rollout_is: truncate the IS weight exp(old - rollout) at this value
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def __post_init__(self) -> None:
        from megatron_rl.steering.controller import SCOPES
        from megatron_rl.steering.interventions import INTERVENTIONS
        from megatron_rl.steering.predictor import POOLING

        if isinstance(self.predictor, dict):
            self.predictor = PredictorConfig(**self.predictor)
        checks = [("mode", self.mode, INTERVENTIONS), ("scope", self.scope, SCOPES),
                  ("logprob_mode", self.logprob_mode, ("recompute", "rollout_is")),
                  ("predictor.repr", self.predictor.repr, POOLING)]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"steering.{key} must be one of {'|'.join(sorted(allowed))}, got {value!r}")
        n = len(self.feature_idxs)
        for key in ("max_activations", "strengths"):
            vals = getattr(self, key)
            if vals and len(vals) != n:
                raise ValueError(f"steering.{key} has {len(vals)} entries but feature_idxs has {n}")
        if self.enable and n == 0:
            raise ValueError("steering.enable is true but steering.feature_idxs is empty")
        if not self.rollout_is_cap > 0:
            raise ValueError(f"steering.rollout_is_cap must be > 0, got {self.rollout_is_cap}")
        p = self.predictor
        if p.enable and not p.max_strength > p.min_strength:
            raise ValueError(f"steering.predictor.max_strength={p.max_strength} must exceed "
                             f"min_strength={p.min_strength}")
