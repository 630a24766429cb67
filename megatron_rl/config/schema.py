"""The root experiment config: typed sections with their defaults in one place.

Sections owned by feature packages (data, reward, logging, agent, steering, ...) are
defined next to their code and mounted here; a package that fails to import fails
here, with its own import error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rl.agent.config import AgentConfig
from megatron_rl.async_rl.config import AsyncConfig
from megatron_rl.algos.config import AlgosConfig
from megatron_rl.data.config import DataConfig
from megatron_rl.logging.config import LoggingConfig
from megatron_rl.models.moe_config import MoEConfig
from megatron_rl.rewards.config import RewardConfig
from megatron_rl.rollout.vllm_config import VLLMConfig
from megatron_rl.steering.config import SteeringConfig
from megatron_rl.token_weights.config import TokenWeightsConfig
from megatron_rl.trainer.gad_config import GADConfig


@dataclass
class ModelConfig:
    path: str = ""                    # HF directory or megatron-rl Megatron checkpoint
    tokenizer_path: str | None = None  # defaults to `path`
    dtype: str = "float32"            # float32 | bfloat16
    layer_spec: str = "auto"          # auto | local | sdpa | te (auto: models/layer_specs.py choose_layer_spec)
    fp8: str = "none"                 # none | hybrid | e4m3: FP8 GEMMs of the trained roles (TE spec, GPU; models/fp8.py)
    fp8_recipe: str = "delayed"       # delayed | tensorwise (FP8 scaling recipe)
    fp8_bf16_layers: int = 0          # first and last N layers stay bf16 (tensorwise recipe only)
    tp: int = 1                       # tensor parallel; world size % (tp * pp * cp) == 0, dp = the rest
    pp: int = 1
    vpp: int | None = None            # interleaved virtual stages per PP rank: needs pp > 1, layers % (pp*vpp)
    cp: int = 1                       # context parallel: sequences split over cp ranks (docs/run_plan.md; plan/layout.py)
    ep: int = 1                       # expert parallel (not supported yet: refused by the run plan)
    etp: int = 1                      # expert tensor parallel (not supported yet: refused by the run plan)
    sequence_parallel: bool = False
    recompute: str = "none"           # none | selective | full
    moe: MoEConfig = field(default_factory=MoEConfig)   # MoE checkpoints only (megatron_rl/models/moe_config.py)
    freeze_vision: bool = True        # vision-language models: the vision tower gets no gradients (false: trained)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"     # constant | cosine | linear
    distributed_optimizer: bool | None = None   # None: on for GPU, off on CPU


@dataclass
class ActorConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    fused_loss: str = "auto"          # auto (fused kernels on GPU) | on | off
    ppo_epochs: int = 1
    # Batch sizes (docs/run_plan.md): mini_batch_size = samples (prompt x response) per optimizer
    # step, GLOBAL over DP ranks (0 = the whole step's data.train_batch_size x rollout.n); it must
    # divide by DP and divide the samples per step. micro_batch_size = rows per forward/backward on
    # one rank. Optimizer steps per rollout = ppo_epochs x samples per step / mini_batch_size.
    mini_batch_size: int = 0
    micro_batch_size: int = 4
    # > 0: log-probs and updates pack whole rows' real tokens into micro-batches of at most this
    # many tokens (>= max prompt + response length; padded to it under PP). 0: micro_batch_size rows.
    max_tokens_per_microbatch: int = 0
    # auto: an exactly on-policy update (one optimizer step per rollout, logprob_mode recompute, no
    # KL-in-reward, no steering) takes its old log-probs from its own forward, detached (ratio == 1),
    # and skips the separate pass (so no rollout/logprob_diff metric); always: keep the pass.
    recompute_old_logprob: str = "auto"      # auto | always
    # while the rollout engine generates: none | state (grad buffers + optimizer state to pinned host
    # memory) | state_and_weights (also the weights; vLLM only). None: state for a colocated vLLM
    # engine, none for the native engine (it generates with the actor's weights).
    offload_during_rollout: str | None = None


@dataclass
class RefConfig:
    enable: bool | None = None        # None: on when a KL term is used
    offload: bool = False             # keep on CPU between uses (GPU only)


@dataclass
class CriticConfig:
    enable: bool = False
    path: str | None = None           # trunk init; defaults to model.path
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    cliprange_value: float = 0.5
    ppo_epochs: int = 1
    # The critic's own batch sizes (a value model is often larger or smaller than the actor):
    # micro_batch_size 0 = actor.micro_batch_size; mini_batch_size (GLOBAL samples per optimizer
    # step, as the actor's) -1 = actor.mini_batch_size, 0 = the whole step.
    micro_batch_size: int = 0
    mini_batch_size: int = -1

    def __post_init__(self) -> None:
        if self.micro_batch_size < 0:
            raise ValueError("critic.micro_batch_size must be >= 0 (0: actor.micro_batch_size), "
                             f"got {self.micro_batch_size}")
        if self.mini_batch_size < -1:
            raise ValueError("critic.mini_batch_size must be >= -1 (-1: actor.mini_batch_size, 0: the whole "
                             f"batch), got {self.mini_batch_size}")


@dataclass
class RolloutConfig:
    engine: str = "native"            # native | vllm
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False          # training rollouts run to max_new_tokens (benchmarks); stop strings still stop
    min_new_tokens: int = 0           # EOS (and stop strings) suppressed before this many tokens
    val_greedy: bool = True           # validation decodes greedily; false: samples at val_temperature (> 0)
    val_temperature: float = 0.0
    logprob_mode: str = "recompute"   # recompute | rollout (use the engine's log-probs)
    # The engine's per-token log-probs of the sampled tokens (`rollout_logprob`): auto = only when something
    # reads them (logprob_mode rollout, steering IS weights, off-policy correction); always = also for the
    # `rollout/logprob_diff` metric; never. Asking vLLM for them slows generation (issue #20: 1.4-1.7x);
    # the native engine has them for free from its own logits and always returns them.
    engine_logprobs: str = "auto"     # auto | always | never
    gpu_memory_utilization: float = 0.5   # vLLM
    colocate: bool = True             # false is refused: use rollout.placement: disaggregated
    # colocated: the engine shares the trainer ranks; disaggregated: the last `num_ranks` ranks of the
    # torchrun world run the engine (its TP = num_ranks), the others train (docs/ASYNC.md)
    placement: str = "colocated"      # colocated | disaggregated
    num_ranks: int = 0                # rollout ranks under placement: disaggregated
    weight_sync_bucket_mb: int = 256
    vllm: VLLMConfig = field(default_factory=VLLMConfig)   # engine: vllm only (megatron_rl/rollout/vllm_config.py)

    def __post_init__(self) -> None:
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"rollout.min_new_tokens={self.min_new_tokens} must be in [0, rollout.max_new_tokens="
                             f"{self.max_new_tokens}]")
        if self.val_greedy and self.val_temperature:
            raise ValueError(f"rollout.val_temperature={self.val_temperature} is unused while rollout.val_greedy is "
                             "true; set val_greedy: false to sample validation responses at that temperature")
        if not self.val_greedy and self.val_temperature <= 0:
            raise ValueError("rollout.val_greedy=false samples validation responses at rollout.val_temperature, "
                             f"which must be > 0 (got {self.val_temperature}); temperature 0 is greedy: set "
                             "val_greedy: true")


@dataclass
class TrainerConfig:
    total_steps: int = 10             # rollout steps (the LR horizon counts optimizer steps: see the run plan)
    seed: int = 1234
    val_before_train: bool = True
    val_every: int = 0                # 0: only before and after
    save_every: int = 0               # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"              # auto | none | PATH
    deterministic: bool = False
    critic_warmup: int = 0
    num_threads: int = 0              # torch intra-op threads on CPU (0 = torch default)
    final_validation: bool = True     # validate after the last step (false: benchmarks)
    save_final: bool = True           # checkpoint after the last step (false: benchmarks)
    async_save: bool = False          # write checkpoints in the background (trainer/async_save.py)
    # step guard: optimizer steps with a non-finite loss or gradient are skipped (weights and optimizer
    # state untouched, counted in actor/skipped_steps); this many in a row stop the run
    max_bad_steps: int = 5
    async_: AsyncConfig = field(default_factory=AsyncConfig)   # YAML `trainer.async` (async_rl/config.py)

    def __post_init__(self) -> None:
        if self.max_bad_steps < 1:
            raise ValueError(f"trainer.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.keep_last < 0:
            raise ValueError(f"trainer.keep_last must be >= 0 (0: keep every checkpoint), got {self.keep_last}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    algos: AlgosConfig = field(default_factory=AlgosConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    gad: GADConfig = field(default_factory=GADConfig)
    token_weights: TokenWeightsConfig = field(default_factory=TokenWeightsConfig)
