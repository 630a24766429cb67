"""`trainer.async`: how generation and training overlap under `rollout.placement: disaggregated`.

The YAML key is `async` (a Python keyword, so the field is `TrainerConfig.async_`; the
loader maps keyword keys to `<key>_`). See docs/ASYNC.md for what each mode promises.
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("sync", "one_step_off", "fully_async")


@dataclass
class AsyncConfig:
    # sync: generate, then train (the rollout ranks idle while the trainer updates);
    # one_step_off: batch k+1 is generated with weights v_{k-1} while the trainer updates on batch k;
    # fully_async: prompts are dispatched up to max_staleness steps ahead, weights pushed as soon as the
    # rollout ranks are between engine calls, samples older than max_staleness versions dropped
    mode: str = "sync"
    max_staleness: int = 1            # fully_async: a trained sample lags the policy by at most this many versions
    partial_rollout: bool = False     # fully_async: a weight push interrupts an in-flight generation, which goes
    #                                   on under the new weights (tokens tagged per version; docs/ASYNC.md)
    request_prompts: int = 0          # prompts per engine call on the rollout ranks (0: a step's whole batch);
    #                                   each call's groups go back to the trainer's buffer as soon as it ends

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"trainer.async.mode must be one of {'|'.join(MODES)}, got {self.mode!r}")
        if self.max_staleness < 0:
            raise ValueError(f"trainer.async.max_staleness must be >= 0, got {self.max_staleness}")
        if self.request_prompts < 0:
            raise ValueError(f"trainer.async.request_prompts must be >= 0 (0: a step's batch), got "
                             f"{self.request_prompts}")

    @property
    def lag(self) -> int:
        """How many steps ahead of training prompts are dispatched (the staleness bound)."""
        return {"sync": 0, "one_step_off": 1, "fully_async": self.max_staleness}[self.mode]
