"""Disaggregated rollout ranks (1 trainer + 1 rollout process, gloo, tiny random Llama): the
asynchronous machinery at zero staleness reproduces the colocated synchronous run exactly, and
one-step-off trains every sample exactly one policy version behind."""
import json

import pytest

from megatron_rl.trainer.main import train_main
from tests.async_rl.workers import train
from tests.helpers import run_multiproc

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(120)]
VOLATILE = ("timing/", "perf/", "async/", "time", "timestamp")
LENGTH_REWARD = '''
def words(response, sample, **kw):
    """A reward every response earns differently: its word count / 5."""
    return len(response.split()) / 5.0
'''


def rows(run_dir):
    return {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl"))}


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def trained(run_dir):
    """step -> (uids, versions), the last record of each step."""
    out = {}
    for line in open(run_dir / "async_samples.jsonl"):
        r = json.loads(line)
        out[r["step"]] = (r["uids"], r["versions"])
    return out


@pytest.fixture
def run(tiny_run, tmp_path):
    overrides, _ = tiny_run
    (tmp_path / "words.py").write_text(LENGTH_REWARD)
    base = [o for o in overrides if not o.startswith(("reward.", "logging.run_dir", "trainer.total_steps"))]
    base += ["reward.name=words", f"reward.custom_functions={{words: '{tmp_path / 'words.py'}:words'}}",
             "reward.num_workers=0", "trainer.total_steps=2", "trainer.save_final=false"]

    def go(name, *extra, disaggregated=True):
        run_dir = tmp_path / name
        ov = base + [f"logging.run_dir={run_dir}", *extra]
        if disaggregated:
            run_multiproc(train, 2, (ov + ["rollout.placement=disaggregated", "rollout.num_ranks=1"],))
        else:
            assert train_main(None, ov) == 0
        return run_dir
    return go


def test_fully_async_at_zero_staleness_reproduces_the_colocated_sync_run(run):
    colocated = rows(run("colocated", disaggregated=False))
    async0_dir = run("async0", "trainer.async.mode=fully_async", "trainer.async.max_staleness=0")
    async0 = rows(async0_dir)
    assert set(async0) == set(colocated) == {0, 1, 2}
    assert colocated[1]["actor/pg_loss"] != 0.0                      # the comparison has signal
    for step in (0, 1, 2):
        a, c = stable(async0[step]), stable(colocated[step])
        assert a.keys() == c.keys(), (step, a.keys() ^ c.keys())
        for k, v in c.items():
            assert a[k] == pytest.approx(v, rel=1e-6, abs=1e-7), (step, k)
    for step in (1, 2):
        assert async0[step]["async/staleness_max"] == 0.0 and async0[step]["async/dropped_stale"] == 0.0
    assert all(v == step - 1 for step, (_, vs) in trained(async0_dir).items() for v in vs)


def test_one_step_off_trains_each_sample_one_version_behind(run):
    run_dir = run("one_step_off", "trainer.async.mode=one_step_off", "trainer.total_steps=3")
    m, t = rows(run_dir), trained(run_dir)
    assert sorted(t) == [1, 2, 3]
    for step, (uids, versions) in t.items():
        assert versions == [max(0, step - 2)] * len(uids)           # batch k+1 generated with v_{k-1}
        assert m[step]["async/staleness_max"] <= 1.0
    assert m[3]["async/overlap_s"] > 0.0
    all_uids = [u for s in sorted(t) for u in t[s][0]]
    assert len(all_uids) == 6                                        # 3 steps x 2 prompts, none lost


def test_fully_async_with_partial_rollouts_trains_within_the_staleness_bound(run):
    """Whether a push lands mid-generation is timing-dependent here (the worker-level test forces
    it); what must hold either way: the run trains every step, no sample lags more than K."""
    run_dir = run("partial", "trainer.async.mode=fully_async", "trainer.async.max_staleness=1",
                  "trainer.async.partial_rollout=true", "rollout.max_new_tokens=12")
    m, t = rows(run_dir), trained(run_dir)
    assert sorted(t) == [1, 2]
    for step, (uids, versions) in t.items():
        assert all(step - 1 - 1 <= v <= step - 1 for v in versions), (step, versions)
        assert m[step]["async/staleness_max"] <= 1.0 and m[step]["async/interrupts"] >= 0.0
