"""What the critic and the GAD discriminator share: a Megatron trunk whose last stage
carries a scalar `value_head`, trained through Megatron's schedule, DDP and optimizer, and
checkpointed like the actor (one Megatron distributed checkpoint under `{name}/`: weights,
head, optimizer and LR schedule, resumable at another DP/TP/PP)."""
from __future__ import annotations

from megatron_rl.data.batch import Batch
from megatron_rl.models.value_head import value_forward
from megatron_rl.trainer.microbatch import make_microbatches
from megatron_rl.models.offload import Offloadable


class ValueModel(Offloadable):
    """`ddp` wraps the trunk (+ head on the last stage); `optimizer` and `scheduler` are Megatron's."""

    def __init__(self, ddp, optimizer, scheduler, micro_batch_size: int):
        if micro_batch_size <= 0:
            raise ValueError(f"{type(self).__name__}: micro_batch_size must be > 0, got {micro_batch_size}")
        self.ddp = ddp
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.mbs = micro_batch_size

    @property
    def model(self):
        return self.ddp.module

    def _microbatches(self, batch: Batch) -> list[dict]:
        device = next(self.model.parameters()).device
        return [{k: v.to(device) for k, v in mb.items()} for mb in make_microbatches(batch, self.mbs)]

    @staticmethod
    def _forward(m, mb):
        return value_forward(m, mb["input_ids"], mb["attention_mask"])

    def save_checkpoint(self, ckpt_dir, name: str) -> None:
        from megatron_rl.trainer.checkpoint import save_value_model
        save_value_model(self, ckpt_dir, name)

    def load_checkpoint(self, ckpt_dir, name: str) -> None:
        from megatron_rl.trainer.checkpoint import load_value_model
        load_value_model(self, ckpt_dir, name)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
