"""The lifecycle every role shares (actor, reference, critic, GAD discriminator, strength
predictor), and the container the recipes loop over.

A recipe calls a role's own forward (log-probs / values / scores) and `update`; around
them it may `offload()` a role whose memory another phase needs (the reference between
its log-prob passes, the trainable state while a colocated engine generates) and
`onload()` it again. The checkpoint manager calls `save_checkpoint` / `load_checkpoint`
on every role it is given, so a new role is saved by listing it in `Roles`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Role(Protocol):
    def offload(self) -> None: ...
    def onload(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def save_checkpoint(self, ckpt_dir: Path, name: str) -> None: ...
    def load_checkpoint(self, ckpt_dir: Path, name: str) -> None: ...


@dataclass
class Roles:
    """The roles of one run; None where the recipe has no such role."""
    actor: object = None            # trainer.policy.Policy (trainable; frozen under predictor training)
    reference: object = None        # Policy (frozen), possibly offloaded between uses
    critic: object = None           # trainer.critic.Critic
    discriminator: object = None    # trainer.discriminator.Discriminator
    predictor: object = None        # steering.predictor_trainer.StrengthPredictorTrainer
    reward_model: object = None     # rewards.reward_model.RewardModel (frozen; no checkpoint state)

    def present(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
