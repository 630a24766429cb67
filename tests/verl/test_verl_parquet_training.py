"""A parquet in verl's GSM8K schema trains with a verl-signature reward function, which
receives the row's data_source, ground truth and extra_info; with DAPO's options on."""
import json

from megatron_rl.trainer.main import train_main
from tests.verl.conftest import verl_gsm8k_rows, write_parquet

REWARD = '''
import json
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    with open(LOG, "a") as f:
        f.write(json.dumps([data_source, solution_str, ground_truth, extra_info]) + "\\n")
    return {"score": float(len(solution_str.split()) % 2), "acc": ground_truth in solution_str}
'''


def test_verl_parquet_trains_with_verl_reward_function(tiny_model, tmp_path):
    rows = verl_gsm8k_rows(8, "train")
    train = write_parquet(tmp_path / "train.parquet", rows)
    log = tmp_path / "calls.jsonl"
    (tmp_path / "reward.py").write_text(f"LOG = {str(log)!r}\n" + REWARD)
    run_dir = tmp_path / "run"
    overrides = [f"model.path={tiny_model}", "model.layer_spec=local", f"data.train_files=[{train}]",
                 "data.train_batch_size=2", "data.max_prompt_length=16", "data.shuffle=false",
                 "rollout.n=2", "rollout.max_new_tokens=5", "actor.micro_batch_size=2", "actor.optim.lr=1e-3",
                 "reward.name=verl_fn", f"reward.custom_functions={{verl_fn: '{tmp_path / 'reward.py'}:compute_score'}}",
                 "reward.num_workers=0", f"logging.run_dir={run_dir}", "logging.sinks=[jsonl]",
                 "trainer.total_steps=1", "trainer.val_before_train=false", "trainer.final_validation=false",
                 "trainer.save_final=false",
                 "algos.dynamic_sampling.enable=true", "algos.dynamic_sampling.max_num_gen_batches=3",
                 "reward.overlong.buffer_len=2", "algos.mask_truncated=true"]
    assert train_main(None, overrides) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) >= 4 and len(calls) % 4 == 0                   # 2 prompts x n=2 per generation round
    by_index = {r["extra_info"]["index"]: r for r in rows}
    for source, _, truth, extra in calls:
        row = by_index[extra["index"]]
        assert source == "openai/gsm8k" and truth == row["reward_model"]["ground_truth"]
        assert extra == row["extra_info"]                            # the row's extra_info, not the sample
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["dynamic_sampling/rounds"] == len(calls) // 4
    assert "reward_extra/acc/mean" in metrics and "reward/overlong_penalty_mean" in metrics
    assert "response_length/truncated_frac" in metrics and "actor/pg_loss" in metrics
