"""`tools/bench_gad_step.py --tiny` (the H100 benchmark's CPU smoke run): every phase
is timed, the phases fit inside the step, and the markdown table lands in $OUT."""
from tests.helpers import make_tiny_hf, write_word_tokenizer


def test_bench_gad_step_times_every_phase_and_writes_the_table(tmp_path, monkeypatch):
    from tools.bench_gad_step import PHASES, main

    src = make_tiny_hf(tmp_path / "src", "llama")
    write_word_tokenizer(tmp_path / "src", "the a river tower describe : that is all .".split())
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    result = main(["--tiny", "--model-src", src, "--workdir", str(tmp_path / "work")])
    phases = result["phases_s"]
    assert sorted(phases) == sorted(p for p, _, _ in PHASES)
    assert all(t > 0 for t in phases.values()), phases
    assert sum(phases.values()) <= result["step_s"]
    md = (tmp_path / "out" / "gad_results.md").read_text()
    assert "| rollout |" in md and "| d_update |" in md and "| **step** |" in md
