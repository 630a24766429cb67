"""The `gad:` config section: generative adversarial distillation (black-box, on-policy).

A discriminator learns to tell the teacher's responses from the student's
(Bradley-Terry loss on (teacher, student) pairs of one prompt); its score of each
student response is the student's reward. Advantages, policy loss and KL terms come
from `algos.*` as for any RL run; `trainer.critic_warmup` steps train the
discriminator first.
"""
from __future__ import annotations

from dataclasses import dataclass

REWARD_NORMS = ("none", "group")
WARMUP_STUDENT = ("sft", "frozen")


@dataclass
class GADConfig:
    enable: bool = False

    # Teacher responses: the sample field that holds the teacher's text (defaults to
    # `data.teacher_response_key`, else "teacher_response"). Tokenised without a chat
    # template (the prompt already ends in the generation prompt), EOS appended, cut at
    # `max_teacher_tokens` (0: rollout.max_new_tokens). A sample without one is an
    # error naming its file:line, or skipped and counted (`gad/skipped_no_teacher`).
    teacher_key: str | None = None
    max_teacher_tokens: int = 0
    skip_missing_teacher: bool = False

    # Discriminator: a GPTModel trunk initialised from `discriminator_path`
    # (default: model.path) plus a scalar head at the last response token, trained
    # with Megatron DDP + optimizer, `d_updates` optimizer steps per training step.
    discriminator_path: str | None = None
    d_lr: float = 1e-6
    d_weight_decay: float = 0.0
    d_clip_grad: float = 1.0
    d_micro_batch_size: int = 4
    d_updates: int = 1
    # The discriminator stops learning after this many steps (null: never), turning it
    # into a fixed reward model: an ablation, and a way to watch the student climb one D.
    freeze_discriminator_after: int | None = None

    # Student reward: D(student) as is (`none`) or standardised within the prompt's
    # group (`group`). With `log_rule_reward` the rule reward (`reward.name`) is also
    # scored and logged as `gad/rule_score`; `rule_reward_weight` > 0 adds it to the
    # reward (and implies scoring it).
    reward_norm: str = "none"
    log_rule_reward: bool = False
    rule_reward_weight: float = 0.0

    # Warm-up (`trainer.critic_warmup` steps): the student waits (`frozen`) or learns
    # the teacher responses by cross-entropy (`sft`, the published recipe), at `sft_lr`
    # (null: the actor's learning rate).
    warmup_student: str = "sft"
    sft_lr: float | None = None

    def __post_init__(self) -> None:
        if self.reward_norm not in REWARD_NORMS:
            raise ValueError(f"gad.reward_norm must be one of {'|'.join(REWARD_NORMS)}, got {self.reward_norm!r}")
        if self.warmup_student not in WARMUP_STUDENT:
            raise ValueError(f"gad.warmup_student must be one of {'|'.join(WARMUP_STUDENT)}, "
                             f"got {self.warmup_student!r}")
        if self.d_micro_batch_size <= 0:
            raise ValueError(f"gad.d_micro_batch_size must be positive, got {self.d_micro_batch_size}")
        if self.d_updates < 1:
            raise ValueError(f"gad.d_updates must be >= 1, got {self.d_updates}")
