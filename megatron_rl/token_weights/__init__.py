"""Per-token loss weights end to end: from reward functions or from the actor's attention (VGR).

    token_weights:
      source: vgr            # none | reward | vgr
      apply_to: pg           # pg | mask
See docs/token_weights.md.
"""
from megatron_rl.token_weights.config import TokenWeightsConfig
from megatron_rl.token_weights.phase import SOURCES, build_token_weights, check_token_weights, register_source

__all__ = ["SOURCES", "TokenWeightsConfig", "build_token_weights", "check_token_weights", "register_source"]
