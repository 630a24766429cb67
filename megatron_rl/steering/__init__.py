"""SAE steering: sae-lens SAE loading, residual-stream interventions driven by a
`SteeringController`, and a strength predictor trained with a GRPO-style policy gradient."""
from megatron_rl.steering.config import PredictorConfig, SteeringConfig
from megatron_rl.steering.sae import SAE, load_sae, save_sae
from megatron_rl.steering.interventions import INTERVENTIONS, Intervention, build_intervention, register_intervention
from megatron_rl.steering.hooks import capture_layer_output, find_layer, run_until_captured
from megatron_rl.steering.controller import SCOPES, SteeringController, generated_positions
from megatron_rl.steering.build import build_steering
from megatron_rl.steering.predictor import StrengthPredictor, group_index, predictor_pg_loss, prompt_repr
from megatron_rl.steering.predictor_trainer import StrengthPredictorTrainer, build_predictor

__all__ = ["SAE", "load_sae", "save_sae", "SteeringConfig", "PredictorConfig", "INTERVENTIONS", "Intervention",
           "build_intervention", "register_intervention", "capture_layer_output", "find_layer",
           "run_until_captured", "SCOPES", "SteeringController", "generated_positions", "build_steering", "StrengthPredictor", "group_index",
           "predictor_pg_loss", "prompt_repr", "StrengthPredictorTrainer", "build_predictor"]
