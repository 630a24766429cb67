"""MoE training metrics: `moe/aux_loss`, `moe/z_loss` and per-layer expert load.

Megatron's routers record the load-balancing and z-loss values of every training forward
in its layer-wise tracker (`moe_utils.get_moe_layer_wise_logging_tracker`, only for losses
whose coefficient is set: `model.moe.aux_loss_coef` / `z_loss_coef`). Megatron's own
`reduce_aux_losses_tracker_across_ranks` averages over DP with `ReduceOp.AVG`, which gloo
lacks, so `collect()` reduces the same way with sums: over PP (each layer lives on one
stage), over the loss's reduce group (the aux loss's partial sums over TP), then the mean
over DP (and over TP for the z-loss, which each TP rank computes on its own logits).
Values are the mean per training forward and per MoE layer, as Megatron's
`track_moe_metrics` logs them.

Expert load: a forward hook on each `TopKRouter` adds its routing map (tokens x experts)
into per-layer counts during training forwards (grad enabled); `collect()` sums them over
the ranks that saw different tokens (DP, TP under sequence parallel, PP) and logs
`moe/load_imbalance/layer_{i}` = max / mean tokens per expert of global layer i (1 =
perfectly balanced; padding tokens of a padded micro-batch count too) and its maximum.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

LOSS_NAMES = {"load_balancing_loss": "moe/aux_loss", "z_loss": "moe/z_loss"}


class MoEMetrics:
    def __init__(self, routers: list, config):
        self.config = config
        self.num_layers = config.num_layers
        self.moe_layers = [i for i, s in enumerate(config.moe_layer_freq) if s] \
            if isinstance(config.moe_layer_freq, list) else list(range(self.num_layers))
        self.counts = torch.zeros(self.num_layers, config.num_moe_experts, dtype=torch.float64)
        self.calls = torch.zeros(self.num_layers, dtype=torch.float64)
        for r in routers:
            r.register_forward_hook(self._count)

    @classmethod
    def attach(cls, chunks) -> "MoEMetrics | None":
        """Hooks on every router of this rank's chunks; None for a dense model."""
        from megatron.core.transformer.moe.router import TopKRouter

        if not chunks[0].arch.is_moe:
            return None
        routers = [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]
        return cls(routers, chunks[0].config)

    def _count(self, router, inputs, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return                          # log-prob passes and rollouts do not count
        routing_map = output[1]             # [tokens, experts] bool
        i = router.layer_number - 1
        self.counts[i] += routing_map.sum(0).detach().to(self.counts)
        self.calls[i] += 1

    def _loss_names(self) -> list[str]:
        names = []
        if self.config.moe_aux_loss_coeff and self.config.moe_router_load_balancing_type == "aux_loss":
            names.append("load_balancing_loss")
        if self.config.moe_z_loss_coeff:
            names.append("z_loss")
        return names

    def collect(self) -> dict[str, float]:
        """The metrics since the last call (collective: every rank calls it); resets them."""
        from megatron.core import parallel_state as mpu
        from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                            get_moe_layer_wise_logging_tracker)

        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        pp, dp, tp = (mpu.get_pipeline_model_parallel_group(), mpu.get_data_parallel_group(),
                      mpu.get_tensor_model_parallel_group())
        calls = self.calls.to(dev, torch.float32)
        dist.all_reduce(calls, group=pp)
        calls = calls.clamp(min=1)
        tracker = get_moe_layer_wise_logging_tracker()
        out = {}
        for name in self._loss_names():
            entry = tracker.get(name, {})
            values = entry.get("values", torch.zeros(self.num_layers)).detach().to(dev, torch.float32).clone()
            dist.all_reduce(values, group=pp)
            if entry.get("reduce_group") is not None:
                dist.all_reduce(values, group=entry["reduce_group"])
                dist.all_reduce(values, group=dp)
                values /= dist.get_world_size(dp)
            else:
                dist.all_reduce(values, group=dp)
                dist.all_reduce(values, group=tp)
                values /= dist.get_world_size(dp) * dist.get_world_size(tp)
            per_layer = values / calls
            out[LOSS_NAMES[name]] = float(per_layer[self.moe_layers].mean())
        clear_aux_losses_tracker()
        counts = self.counts.to(dev, torch.float32)
        for group in [pp, dp] + ([tp] if self.config.sequence_parallel else []):
            dist.all_reduce(counts, group=group)
        imbalance = []
        for i in self.moe_layers:
            mean = counts[i].mean()
            if mean > 0:
                imbalance.append(float(counts[i].max() / mean))
                out[f"moe/load_imbalance/layer_{i}"] = imbalance[-1]
        if imbalance:
            out["moe/load_imbalance_max"] = max(imbalance)
        self.counts.zero_()
        self.calls.zero_()
        return out
