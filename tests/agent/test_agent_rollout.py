"""End-to-end agent rollouts: scripted policy, real BM25 server on loopback, token-level checks."""
from __future__ import annotations

import pytest
import torch

from megatron_rl.agent import AgentConfig, AgentRolloutEngine
from megatron_rl.agent.actions import INVALID_ACTION_MESSAGE, OBS_CLOSE, OBS_OPEN
from megatron_rl.agent.reward import search_qa_reward
from megatron_rl.rollout.protocol import RolloutEngine, SamplingParams

from tests.agent.conftest import ScriptedEngine, prompt_batch

QUESTIONS = {"q1": "What is the capital of Zorvania?",
             "q2": "Into which lake does the Quillon flow?",
             "q3": "Who designed Brevik Tower?"}
ANSWERS = {"q1": ["Kelmar"], "q2": ["Lake Ostrel", "Ostrel"], "q3": ["Imra Solenne"]}
SCRIPTS = {
    "q1": ["<think>look it up</think><search>capital of Zorvania</search>", "<answer>Kelmar</answer>"],
    "q2": ["I am not sure", "<answer>Lake Geneva</answer>"],                       # invalid, then wrong
    "q3": ["<search>Brevik Tower</search>", "<search>architect Brevik</search>",
           "<search>Imra</search>"],                                               # runs out of turns
}
OBS_Q1 = "Doc 1(Title: Zorvania) Zorvania's capital is Kelmar.\n"


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def injected(tok, obs, max_obs=10_000):
    return enc(tok, OBS_OPEN) + enc(tok, obs)[:max_obs] + enc(tok, OBS_CLOSE)


def run(tok, url, scripts=SCRIPTS, questions=QUESTIONS, n=1, on_turn=None, **overrides):
    cfg = AgentConfig(**{"enable": True, "max_turns": 2, "retriever_url": url, "topk": 1,
                         "timeout_s": 2.0, "retries": 1, "backoff_s": 0.01, **overrides})
    inner = ScriptedEngine(tok, scripts, on_turn)
    agent = AgentRolloutEngine(inner, tok, cfg)
    out = agent.generate(prompt_batch(tok, questions, ANSWERS), SamplingParams(n=n, max_new_tokens=64))
    return agent, inner, out


def row(out, r):
    n = out.samples[r]["response_length"]
    return (out["response_ids"][r, :n].tolist(), out["response_mask"][r, :n].tolist(),
            out["info_mask"][r, :n].tolist(), out["rollout_logprob"][r, :n].tolist())


def test_agent_engine_speaks_the_rollout_protocol(tokenizer, retriever):
    agent = AgentRolloutEngine(ScriptedEngine(tokenizer, SCRIPTS), tokenizer,
                               AgentConfig(retriever_url=retriever.url))
    assert isinstance(agent, RolloutEngine)


def test_search_result_is_injected_between_generated_turns_token_by_token(tokenizer, retriever):
    _, _, out = run(tokenizer, retriever.url)
    g0, g1 = enc(tokenizer, SCRIPTS["q1"][0]), enc(tokenizer, SCRIPTS["q1"][1])
    inj = injected(tokenizer, OBS_Q1)
    ids, mask, info, logp = row(out, 0)
    assert ids == g0 + inj + g1
    assert mask == [1.0] * len(g0) + [0.0] * len(inj) + [1.0] * len(g1)
    assert info == [0.0] * len(g0) + [1.0] * len(inj) + [0.0] * len(g1)
    expected_logp = ([-1 - k / 100 for k in range(len(g0))] + [0.0] * len(inj)
                     + [-2 - k / 100 for k in range(len(g1))])
    assert logp == pytest.approx(expected_logp)
    assert out["response_mask"].dtype == torch.float32 and out["info_mask"].dtype == torch.float32


def test_padding_after_the_response_is_pad_and_masked(tokenizer, retriever):
    _, _, out = run(tokenizer, retriever.url)
    for r, s in enumerate(out.samples):
        n = s["response_length"]
        assert out["response_ids"][r, n:].eq(tokenizer.pad_token_id).all()
        assert out["response_mask"][r, n:].sum() == 0 and out["info_mask"][r, n:].sum() == 0


def test_turn_records_hold_action_query_observation_and_counts(tokenizer, retriever):
    _, _, out = run(tokenizer, retriever.url)
    q1 = out.samples[0]
    assert [t["action"] for t in q1["turns"]] == ["search", "answer"]
    assert q1["turns"][0]["query"] == "capital of Zorvania"
    assert q1["turns"][0]["observation"] == OBS_Q1
    assert q1["turns"][0]["n_injected"] == len(injected(tokenizer, OBS_Q1))
    assert q1["turns"][1]["n_generated"] == len(enc(tokenizer, "<answer>Kelmar</answer>"))
    assert (q1["n_turns"], q1["n_tool_calls"], q1["n_tool_errors"], q1["answer"], q1["stop_reason"]) == \
        (2, 1, 0, "Kelmar", "answer")


def test_invalid_action_gets_the_masked_corrective_message(tokenizer, retriever):
    _, _, out = run(tokenizer, retriever.url)
    g0, note, g1 = (enc(tokenizer, SCRIPTS["q2"][0]), enc(tokenizer, INVALID_ACTION_MESSAGE),
                    enc(tokenizer, SCRIPTS["q2"][1]))
    ids, mask, info, _ = row(out, 1)
    assert ids == g0 + note + g1
    assert mask == [1.0] * len(g0) + [0.0] * len(note) + [1.0] * len(g1)
    assert out.samples[1]["n_invalid_actions"] == 1 and out.samples[1]["turns"][0]["action"] == "invalid"


def test_final_turn_after_max_turns_runs_no_tool(tokenizer, retriever):
    _, inner, out = run(tokenizer, retriever.url)
    q3 = out.samples[2]
    assert [t["action"] for t in q3["turns"]] == ["search", "search", "search"]
    assert q3["n_tool_calls"] == 2 and q3["stop_reason"] == "max_turns" and not q3["finished"]
    assert q3["turns"][2]["n_injected"] == 0 and "observation" not in q3["turns"][2]
    assert [c["uids"] for c in inner.calls] == [["q1", "q2", "q3"], ["q1", "q2", "q3"], ["q3"]]


def test_inner_engine_continues_from_prompt_plus_everything_so_far(tokenizer, retriever):
    _, inner, out = run(tokenizer, retriever.url)
    prompt = enc(tokenizer, QUESTIONS["q3"])
    n = out.samples[2]["response_length"]
    ids = out["response_ids"][2, :n].tolist()
    last = inner.calls[2]
    assert last["contexts"][0] == prompt + ids[: len(ids) - out.samples[2]["turns"][2]["n_generated"]]
    assert last["sampling"].n == 1 and "</search>" in last["sampling"].stop and "</answer>" in last["sampling"].stop


def test_state_masking_off_trains_on_injected_tokens_but_still_marks_them(tokenizer, retriever):
    _, _, out = run(tokenizer, retriever.url, state_masking=False)
    ids, mask, info, _ = row(out, 0)
    assert mask == [1.0] * len(ids)
    assert sum(info) == len(injected(tokenizer, OBS_Q1))


def test_observation_is_truncated_to_max_obs_length_tokens(tokenizer, retriever):
    _, _, out = run(tokenizer, retriever.url, max_obs_length=4)
    g0, g1 = enc(tokenizer, SCRIPTS["q1"][0]), enc(tokenizer, SCRIPTS["q1"][1])
    ids, _, info, _ = row(out, 0)
    assert ids == g0 + injected(tokenizer, OBS_Q1, max_obs=4) + g1
    assert sum(info) == len(enc(tokenizer, OBS_OPEN)) + 4 + len(enc(tokenizer, OBS_CLOSE))


def test_response_is_cut_at_max_response_length_and_finished(tokenizer, retriever):
    g0 = enc(tokenizer, SCRIPTS["q1"][0])
    limit = len(g0) + 3                      # room for three injected tokens only
    _, inner, out = run(tokenizer, retriever.url, max_response_length=limit)
    ids, mask, _, _ = row(out, 0)
    assert ids == (g0 + injected(tokenizer, OBS_Q1))[:limit]
    assert out.samples[0]["stop_reason"] == "length" and out["response_ids"].shape[1] <= limit
    assert all(c["sampling"].max_new_tokens <= limit for c in inner.calls)


def test_eos_without_action_ends_the_sample(tokenizer, retriever):
    _, _, out = run(tokenizer, retriever.url, scripts={"q1": ["I give up<eos>"]}, questions={"q1": QUESTIONS["q1"]})
    s = out.samples[0]
    assert (s["stop_reason"], s["n_turns"], s["n_invalid_actions"], s["finished"]) == ("eos", 1, 0, False)
    assert out["response_ids"][0, s["response_length"] - 1] == tokenizer.eos_token_id


def test_n_samples_per_prompt_are_adjacent_and_grouped_by_uid(tokenizer, retriever):
    _, _, out = run(tokenizer, retriever.url, n=2)
    assert [s["uid"] for s in out.samples] == ["q1", "q1", "q2", "q2", "q3", "q3"]
    assert [s["group"] for s in out.samples] == ["q1", "q1", "q2", "q2", "q3", "q3"]
    assert torch.equal(out["response_ids"][0], out["response_ids"][1])


def test_rewards_and_metrics_of_a_rollout(tokenizer, retriever):
    agent, _, out = run(tokenizer, retriever.url)
    text = [tokenizer.decode(out["response_ids"][r], skip_special_tokens=True) for r in range(len(out))]
    assert [search_qa_reward(t, s) for t, s in zip(text, out.samples)] == [1.0, 0.0, 0.0]
    assert [search_qa_reward(t, s, format_score=0.1) for t, s in zip(text, out.samples)] == [1.0, 0.1, 0.0]
    assert agent.last_metrics == {"agent/turns_mean": pytest.approx(7 / 3), "agent/search_calls": 3.0,
                                  "agent/tool_errors": 0.0, "agent/invalid_actions": 1.0,
                                  "agent/finished_frac": pytest.approx(2 / 3),
                                  "agent/response_length_mean": pytest.approx(
                                      sum(s["response_length"] for s in out.samples) / 3)}


def test_server_stopped_mid_rollout_costs_error_observations_only(tokenizer, retriever):
    scripts = {"q1": ["<search>capital of Zorvania</search>", "<search>Kelmar</search>", "<answer>Kelmar</answer>"],
               "q3": ["<search>Brevik Tower</search>", "<search>architect</search>", "<answer>Imra Solenne</answer>"]}
    questions = {k: QUESTIONS[k] for k in scripts}

    def stop_before_second_turn(turn):
        if turn == 1:
            retriever.stop()

    agent, _, out = run(tokenizer, retriever.url, scripts, questions, on_turn=stop_before_second_turn)
    assert [s["stop_reason"] for s in out.samples] == ["answer", "answer"]
    assert [s["n_tool_errors"] for s in out.samples] == [1, 1]
    assert agent.last_metrics["agent/tool_errors"] == 2.0 and agent.tools["search"].errors == 1
    q1 = out.samples[0]["turns"]
    assert q1[0]["observation"] == OBS_Q1 and not q1[0]["error"]
    assert q1[1]["error"] and q1[1]["observation"].startswith("search error:")
    ids, mask, info, _ = row(out, 0)
    assert ids[-len(enc(tokenizer, "<answer>Kelmar</answer>")):] == enc(tokenizer, "<answer>Kelmar</answer>")
    assert sum(info) == q1[0]["n_injected"] + q1[1]["n_injected"]

    retriever.start()                      # same port: the next rollout's calls succeed
    agent, _, out = run(tokenizer, retriever.url, scripts, questions)
    assert agent.last_metrics["agent/tool_errors"] == 0.0
    assert out.samples[0]["turns"][0]["observation"] == OBS_Q1
