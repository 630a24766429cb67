"""SAE steering: sae-lens SAE loading, residual-stream interventions driven by a
`SteeringController`, and a strength predictor trained with a GRPO-style policy gradient."""
from megatron_rl.steering.config import PredictorConfig, SteeringConfig
from megatron_rl.steering.sae import SAE, load_sae

__all__ = ["SAE", "load_sae", "SteeringConfig", "PredictorConfig"]
