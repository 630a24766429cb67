"""`MrlSteeredLlamaForCausalLM`: vLLM's LlamaForCausalLM with the graph-safe steering add
(steering/vllm_graph.py) built into the decoder layers named by `hf_config.mrl_steering_layers`.

Imported by vLLM's model registry (it needs vLLM). Weight names and loading are the base
class's; the buffers are non-persistent, so checkpoints and weight syncs never see them.
"""
from __future__ import annotations

from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from megatron_rl.steering.vllm_graph import LAYERS_KEY, SteeredOutput, layer_index


class SteeredLlamaDecoderLayer(SteeredOutput, LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        cfg = vllm_config.model_config.hf_config
        self.mrl_steered = layer_index(prefix) in set(getattr(cfg, LAYERS_KEY, None) or ())
        if self.mrl_steered:
            self.init_steering(cfg.hidden_size)

    def forward(self, positions, hidden_states, residual, **kwargs):
        hidden_states, residual = super().forward(positions, hidden_states, residual, **kwargs)
        if self.mrl_steered:          # fixed at build time: a constant for torch.compile
            hidden_states = self.steer_output(positions, hidden_states)
        return hidden_states, residual


class SteeredLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SteeredLlamaDecoderLayer)
