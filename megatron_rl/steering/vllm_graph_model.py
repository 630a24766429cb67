"""`MrlSteeredLlamaForCausalLM`: vLLM's LlamaForCausalLM with the graph-safe steering add
(steering/vllm_graph.py) built into the decoder layers named by `hf_config.mrl_steering_layers`,
and the `ModelState` that gives each request its own steering row.

Imported by vLLM's model registry (it needs vLLM). Weight names and loading are the base
class's; the buffers are non-persistent, so checkpoints and weight syncs never see them.
"""
from __future__ import annotations

from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from megatron_rl.steering.vllm_graph import EXTRA_KEY, LAYERS_KEY, SteeredOutput, fill_token_slots, layer_index


def _token_capacity(vllm_config) -> int:
    """Tokens in one scheduled batch, CUDA-graph padding included."""
    cap = getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
    return max(int(vllm_config.scheduler_config.max_num_batched_tokens), int(cap))


class SteeredLlamaDecoderLayer(SteeredOutput, LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        cfg = vllm_config.model_config.hf_config
        self.mrl_steered = layer_index(prefix) in set(getattr(cfg, LAYERS_KEY, None) or ())
        if self.mrl_steered:
            self.init_steering(cfg.hidden_size, vllm_config.scheduler_config.max_num_seqs,
                               _token_capacity(vllm_config))

    def forward(self, positions, hidden_states, residual, **kwargs):
        hidden_states, residual = super().forward(positions, hidden_states, residual, **kwargs)
        if self.mrl_steered:          # fixed at build time: a constant for torch.compile
            hidden_states = self.steer_output(positions, hidden_states)
        return hidden_states, residual


class SteeringModelState(DefaultModelState):
    """Binds each new request's steering row (`extra_args["mrl_steering"]`) to its request
    slot, and maps the tokens of every scheduled batch to their slots before the forward."""

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.steered = [m for m in model.modules() if getattr(m, "mrl_steered", False)]
        for m in self.steered:
            m.mrl_slots_live = True

    def add_request(self, req_index, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        sp = new_req_data.sampling_params
        spec = (sp.extra_args or {}).get(EXTRA_KEY) if sp is not None else None
        for m in self.steered:
            state = getattr(m, "mrl_steering", None)
            if state is not None:
                state.bind_request(req_index, spec, len(new_req_data.prompt_token_ids or ()))

    def prepare_inputs(self, input_batch, req_states):
        out = super().prepare_inputs(input_batch, req_states)
        for m in self.steered:
            fill_token_slots(m, input_batch.idx_mapping, input_batch.query_start_loc, input_batch.num_reqs,
                             input_batch.num_tokens)
        return out


class SteeredLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SteeredLlamaDecoderLayer)

    @staticmethod
    def get_model_state_cls():
        return SteeringModelState
