"""`megatron-rl import-config --from verl`: a verl Megatron GRPO config plus the overrides of
verl's run_qwen2-7b_math_megatron.sh gives our config with the same batch sizes, lengths,
n, lr, TP/PP, estimator and KL settings; untranslated keys are listed with reasons."""
from pathlib import Path

import yaml

from megatron_rl.cli import main
from megatron_rl.config import load_experiment_config
from megatron_rl.plan import resolve_plan
from tests.verl.conftest import verl_gsm8k_rows, write_parquet

FIXTURE = Path(__file__).with_name("verl_megatron_grpo.yaml")


def launch_overrides(train, test):
    return ["algorithm.adv_estimator=grpo", f"data.train_files={train}", f"data.val_files={test}",
            "data.train_batch_size=64", "data.max_prompt_length=1024", "data.max_response_length=2048",
            "actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct", "actor_rollout_ref.actor.optim.lr=2e-6",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=3",
            "actor_rollout_ref.actor.ppo_mini_batch_size=16", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
            "actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_coef=0.001",
            "actor_rollout_ref.actor.kl_loss_type=low_var_kl", "actor_rollout_ref.actor.entropy_coeff=0",
            "actor_rollout_ref.actor.clip_ratio_high=0.28",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.tensor_model_parallel_size=2", "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.gpu_memory_utilization=0.6", "actor_rollout_ref.rollout.n=5",
            "actor_rollout_ref.rollout.temperature=0.9", "actor_rollout_ref.rollout.top_p=0.95",
            "algorithm.use_kl_in_reward=False", "trainer.logger=['console','wandb']", "trainer.save_freq=20",
            "trainer.test_freq=5", "trainer.total_epochs=3"]


def test_import_verl_megatron_grpo(tmp_path, capsys):
    train = write_parquet(tmp_path / "train.parquet", verl_gsm8k_rows(200, "train"))
    test = write_parquet(tmp_path / "test.parquet", verl_gsm8k_rows(8, "test"))
    out = tmp_path / "ours.yaml"
    assert main(["import-config", "--from", "verl", str(FIXTURE), *launch_overrides(train, test),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cfg = load_experiment_config(out)
    assert cfg.data.train_files == [train] and cfg.data.val_files == [test]
    assert (cfg.data.train_batch_size, cfg.data.max_prompt_length, cfg.rollout.max_new_tokens) == (64, 1024, 2048)
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p) == (5, 0.9, 0.95)
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm.tensor_parallel_size == 2
    assert cfg.rollout.gpu_memory_utilization == 0.6 and cfg.rollout.val_greedy
    assert cfg.actor.mini_batch_size == 16 * 5                     # verl counts prompts, we count samples
    assert cfg.actor.micro_batch_size == 4 and cfg.actor.optim.lr == 2e-6
    assert (cfg.model.tp, cfg.model.pp, cfg.model.vpp, cfg.model.sequence_parallel) == (2, 2, None, True)
    assert (cfg.algos.clip_low, cfg.algos.clip_high, cfg.algos.clip_c) == (0.2, 0.28, 3.0)
    assert cfg.algos.adv_estimator == "grpo" and not cfg.critic.enable and cfg.algos.norm_by_std
    assert cfg.algos.use_kl_loss and cfg.algos.kl_loss_coef == 0.001 and cfg.algos.kl_loss_kind == "low_var_kl"
    assert not cfg.algos.use_kl_in_reward and cfg.algos.kl_ctrl == "fixed" and cfg.algos.entropy_coef == 0.0
    assert cfg.trainer.total_steps == 3 * (200 // 64)              # total_epochs x batches per epoch
    assert (cfg.trainer.save_every, cfg.trainer.val_every) == (20, 5)
    assert cfg.actor.optim.lr_warmup_steps == 3 * 4               # verl's rollout steps x optimizer steps/rollout
    assert cfg.logging.sinks == ["console", "wandb"] and cfg.reward.name == "verl_default"
    # every set key without a counterpart is named, with its reason
    for key in ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", "actor_rollout_ref.rollout.enforce_eager",
                "actor_rollout_ref.actor.use_torch_compile", "trainer.n_gpus_per_node", "trainer.balance_batch",
                "actor_rollout_ref.actor.checkpoint.contents", "actor_rollout_ref.rollout.dtype"):
        assert f"  {key} = " in printed, key
    assert "actor_rollout_ref.ref.megatron.tensor_model_parallel_size" not in printed   # equal to the actor's
    plan = resolve_plan(cfg, world_size=8, device="cuda")         # the layout verl ran on: 8 GPUs, TP2 PP2
    assert plan.layout.dp == 2 and plan.batch.samples_per_step == 320 and plan.batch.optimizer_steps_per_rollout == 4


def test_untranslatable_values_are_reported_not_dropped(tmp_path, capsys):
    out = tmp_path / "ours.yaml"
    assert main(["import-config", "--from", "verl", str(FIXTURE), "algorithm.adv_estimator=remax",
                 "data.truncation=middle", "trainer.total_training_steps=7", "+trainer.some_new_key=1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "algorithm.adv_estimator = 'remax': estimator 'remax'" in printed
    assert "data.truncation = 'middle'" in printed and "trainer.some_new_key = 1: no megatron-rl equivalent" in printed
    written = yaml.safe_load(out.read_text())
    assert written["trainer"]["total_steps"] == 7 and "adv_estimator" not in written.get("algos", {})
