"""Metric names that stay stable across versions (dashboards and `plot_run` read them).

Groups: `actor/*` (policy update), `critic/*`, `reward/*` (scores of this step's
rollouts), `val/*` (validation), `response_length/*`, `rollout/*` (engine), `timing/<phase>`
(seconds, recorded by `MetricsLogger.timer`), `perf/*` (throughput, memory).
"""

# policy update
ACTOR_PG_LOSS = "actor/pg_loss"
ACTOR_KL_LOSS = "actor/kl_loss"             # KL to the reference, as a loss term
ACTOR_PPO_KL = "actor/ppo_kl"               # KL between old and current policy
ACTOR_CLIPFRAC = "actor/pg_clipfrac"
ACTOR_ENTROPY = "actor/entropy"
ACTOR_GRAD_NORM = "actor/grad_norm"
ACTOR_LR = "actor/lr"
# critic
CRITIC_VF_LOSS = "critic/vf_loss"
# rewards
REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
REWARD_KL = "reward/kl"                      # KL penalty folded into the reward
REWARD_FAILURES = "reward/failures"
REWARD_TIMEOUTS = "reward/timeouts"
# validation
VAL_REWARD = "val/reward"
# rollouts
RESPONSE_LENGTH_MEAN = "response_length/mean"
ROLLOUT_LOGPROB_DIFF = "rollout/logprob_diff"
# timing
TIMING_STEP = "timing/step"

KL_KEYS = (ACTOR_KL_LOSS, ACTOR_PPO_KL, REWARD_KL)
