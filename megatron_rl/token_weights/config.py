"""`TokenWeightsConfig`: the `token_weights:` YAML section (per-token loss weights).

Where weights come from (`source`), where they apply (`apply_to`) and, for VGR, how
attention is read and how context is found in the prompt. See docs/token_weights.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rl.algos.token_weights import APPLY_TO

SOURCES = ("none", "reward", "vgr")
MISSING = ("warn_once", "error")


def _default_markers() -> list[list[str]]:
    return [["<document>", "</document>"], ["<information>", "</information>"],
            ["<|vision_start|>", "<|vision_end|>"]]


@dataclass
class TokenWeightsConfig:
    # Source: none | reward (a reward fn returns {"score", "token_weights"}) | vgr
    # (weights from the actor's attention of response tokens over the prompt).
    source: str = "none"

    # Where weights apply: "pg" scales the policy-gradient term only (KL, entropy and
    # token-count denominators unchanged); "mask" multiplies the loss mask (all terms
    # and denominators). This key wins over `algos.token_weights_apply_to`, which the
    # phase sets to the same value when a source is on.
    apply_to: str = "pg"

    # VGR post-processing: weights are normalised to mean 1 per sequence, then clipped
    # to `clip` [min, max] (null = no clipping); `smooth_sigma` smooths them along the
    # response (Gaussian sigma in tokens, 0 = off). Reward weights are used as returned.
    clip: list[float] | None = field(default_factory=lambda: [0.2, 3.0])
    smooth_sigma: float = 0.0

    # VGR: average the attention of the last k layers (0 = all layers); response rows
    # are computed `row_chunk` queries at a time (bounds memory at long responses);
    # `micro_batch_size` 0 = the actor's micro-batch size.
    last_k_layers: int = 4
    row_chunk: int = 512
    micro_batch_size: int = 0

    # Context spans in the prompt, as [start, end] marker pairs matched in the decoded
    # prompt text (special tokens such as <|vision_start|> or text such as
    # <information>): tokens between a pair are context; other real prompt tokens,
    # markers excluded, are instruction. A prompt with no context gets weights 1.
    context_markers: list[list[str]] = field(default_factory=_default_markers)

    # Reward source: what to do when no reward function returned weights in a step.
    missing: str = "warn_once"

    def __post_init__(self) -> None:
        for key, value, valid in (("source", self.source, SOURCES), ("apply_to", self.apply_to, APPLY_TO),
                                  ("missing", self.missing, MISSING)):
            if value not in valid:
                raise ValueError(f"token_weights.{key} must be one of {'|'.join(valid)}, got {value!r}")
        if self.clip is not None and (len(self.clip) != 2 or not 0 <= self.clip[0] <= self.clip[1]):
            raise ValueError(f"token_weights.clip must be [min, max] with 0 <= min <= max (or null), got {self.clip}")
        if self.last_k_layers < 0 or self.row_chunk <= 0 or self.micro_batch_size < 0:
            raise ValueError("token_weights.last_k_layers and micro_batch_size must be >= 0 and row_chunk > 0, "
                             f"got {self.last_k_layers}, {self.micro_batch_size}, {self.row_chunk}")
        if self.smooth_sigma < 0:
            raise ValueError(f"token_weights.smooth_sigma must be >= 0, got {self.smooth_sigma}")
        for i, pair in enumerate(self.context_markers):
            if len(pair) != 2 or not all(isinstance(m, str) and m for m in pair):
                raise ValueError(f"token_weights.context_markers[{i}] must be a [start, end] pair of "
                                 f"non-empty strings, got {pair!r}")
