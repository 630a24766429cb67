"""`StrengthPredictorTrainer`: the optimizer, update step, metrics and checkpoint state of the
strength predictor. The LLM is frozen: its parameters must have requires_grad False and none of
them may reach this optimizer (asserted at construction)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from megatron_rl.steering.config import PredictorConfig
from megatron_rl.steering.predictor import StrengthPredictor, predictor_pg_loss


PREDICTOR_FILE = "predictor.pt"


def _params(modules) -> list[torch.nn.Parameter]:
    if modules is None:
        return []
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    return [p for m in modules for p in m.parameters()]


class StrengthPredictorTrainer:
    """Adam over the predictor only. `feature_names` label metrics `steering/strength_mean/<name>`.

    Under data parallelism every rank holds the same predictor; gradients are averaged over the
    data-parallel group before the step, so the replicas stay identical.
    """

    def __init__(self, predictor: StrengthPredictor, frozen_llm=None, lr: float = 1e-3,
                 feature_names: Sequence | None = None, max_grad_norm: float | None = 1.0):
        self.predictor, self.max_grad_norm = predictor, max_grad_norm
        llm_params = _params(frozen_llm)
        trainable = [n for m in (frozen_llm if isinstance(frozen_llm, (list, tuple)) else [frozen_llm])
                     if m is not None for n, p in m.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the LLM must be frozen for predictor training; {len(trainable)} parameters have "
                             f"requires_grad=True, e.g. {trainable[:3]}")
        self.optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
        llm_ids = {id(p) for p in llm_params}
        leaked = [n for n, p in predictor.named_parameters() if id(p) in llm_ids]
        if leaked:
            raise AssertionError(f"LLM parameters in the predictor optimizer: {leaked}")
        n = predictor.n_features
        self.feature_names = [str(f) for f in (feature_names if feature_names is not None else range(n))]
        if len(self.feature_names) != n:
            raise ValueError(f"{len(self.feature_names)} feature_names for a predictor with {n} features")
        self.steps = 0

    def step(self, reprs: torch.Tensor, strengths: torch.Tensor, rewards: torch.Tensor, group_index) -> dict:
        """One policy-gradient update from sampled `strengths [N, F]` and their `rewards [N]`.

        `reprs` is `[N, H]` or the `[B, H]` prompt representations with N = B * n (rows grouped per
        prompt as `StrengthPredictor.sample` returns them). Log-probs are recomputed here, so the
        rollout may happen in between without keeping a graph alive.
        """
        if reprs.shape[0] != strengths.shape[0]:
            if strengths.shape[0] % reprs.shape[0]:
                raise ValueError(f"{strengths.shape[0]} strengths rows for {reprs.shape[0]} prompt reprs")
            reprs = reprs.repeat_interleave(strengths.shape[0] // reprs.shape[0], dim=0)
        self.predictor.train()
        loss = predictor_pg_loss(self.predictor.log_prob(reprs.detach(), strengths), rewards, group_index)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_grads_over_dp(self.predictor)
        grad_norm = None
        if self.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), self.max_grad_norm)
        # a non-finite gradient (identical on every DP rank after the averaging) skips the step:
        # weights and Adam state stay as they were; the trainer counts it (trainer.max_bad_steps)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in self.predictor.parameters() if p.grad is not None)
        if finite:
            self.optimizer.step()
            self.steps += 1
        metrics = self.metrics(strengths, rewards)
        metrics["steering/optimizer_steps"] = 1.0
        metrics["steering/skipped_steps"] = float(not finite)
        metrics["steering/predictor_loss"] = float(loss.detach())
        if grad_norm is not None:
            metrics["steering/predictor_grad_norm"] = float(grad_norm)
        return metrics

    @torch.no_grad()
    def metrics(self, strengths: torch.Tensor, rewards: torch.Tensor | None = None) -> dict:
        """Mean/std of the sampled strengths (over all features, and per feature), the policy std
        per feature, and the mean reward of the steered samples."""
        s = strengths.detach().float()
        std = s.std(0) if s.shape[0] > 1 else torch.zeros(s.shape[1])
        pol = self.predictor.std()
        out = {"steering/strength_mean": float(s.mean()),
               "steering/strength_std": float(s.std()) if s.numel() > 1 else 0.0}
        for i, name in enumerate(self.feature_names):
            out[f"steering/strength_mean/{name}"] = float(s[:, i].mean())
            out[f"steering/strength_std/{name}"] = float(std[i])
            out[f"steering/policy_std/{name}"] = float(pol[i])
        if rewards is not None:
            out["steering/reward_mean"] = float(rewards.float().mean())
        return out

    def state_dict(self) -> dict:
        return {"predictor": self.predictor.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state.get("steps", 0))

    # --- role lifecycle (megatron_rl/trainer/roles.py) ----------------------------------
    def offload(self) -> None:
        """Nothing to move: the predictor is a small MLP next to a frozen LLM."""

    def onload(self) -> None:
        """Nothing to move (see `offload`)."""

    def save_checkpoint(self, ckpt_dir, name: str) -> None:
        """Rank 0 writes `predictor.pt` (the replicas are identical: gradients are DP-averaged)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(self.state_dict(), Path(ckpt_dir) / PREDICTOR_FILE)

    def load_checkpoint(self, ckpt_dir, name: str) -> None:
        f = Path(ckpt_dir) / PREDICTOR_FILE
        if not f.exists():
            raise FileNotFoundError(f"{f}: not a strength-predictor checkpoint (trainer.resume={ckpt_dir}); "
                                    f"an LLM-training checkpoint cannot resume predictor training")
        self.load_state_dict(torch.load(f, weights_only=True))    # tensors and primitives only: no pickled objects


def _average_grads_over_dp(module: torch.nn.Module) -> None:
    from megatron_rl.parallel.data_parallel import dp_rank_size

    _, size = dp_rank_size()
    if size == 1:
        return
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    group = mpu.get_data_parallel_group()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= size


def build_predictor(cfg: PredictorConfig, d_model: int, n_features: int, frozen_llm=None,
                    feature_names: Sequence | None = None) -> tuple[StrengthPredictor, StrengthPredictorTrainer]:
    predictor = StrengthPredictor(d_model, n_features, hidden=cfg.hidden, min_strength=cfg.min_strength,
                                  max_strength=cfg.max_strength, init_std=cfg.init_std, learn_std=cfg.learn_std)
    return predictor, StrengthPredictorTrainer(predictor, frozen_llm, lr=cfg.lr, feature_names=feature_names)
