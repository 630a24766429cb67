"""The agent loop around the REAL native engine (tiny Megatron model, KV cache, stop
strings) with the real BM25 server on loopback. The policy's tokens are forced by a
scripted sampler (a test-only subclass that replaces the engine's `_sample`: the
scripted token is emitted with the model's own log-prob of it), so searches really
happen; injected spans, info/loss masks, rollout log-probs (against the trainer's
recompute) and the reward are checked token by token."""
from __future__ import annotations

import pytest
import torch

from megatron_rl.agent import AgentConfig, AgentRolloutEngine
from megatron_rl.agent.actions import OBS_CLOSE, OBS_OPEN
from megatron_rl.agent.reward import search_qa_reward
from megatron_rl.rollout.native_engine import NativeEngine
from megatron_rl.rollout.protocol import SamplingParams

from tests.agent.conftest import prompt_batch
from tests.helpers import make_tiny_hf

QUESTIONS = {"q1": "What is the capital of Zorvania?", "q2": "Who designed Brevik Tower?"}
ANSWERS = {"q1": ["Kelmar"], "q2": ["Imra Solenne"]}
# Text after a closing tag must be cut by the engine's own stop-string check.
SCRIPTS = {"q1": ["<search>capital of Zorvania</search> and more text", "<answer>Kelmar</answer>"],
           "q2": ["<search>Brevik Tower</search>", "<answer>Imra Solenne</answer> extra"]}
OBS = {"q1": "Doc 1(Title: Zorvania) Zorvania's capital is Kelmar.\n",
       "q2": "Doc 1(Title: Brevik Tower) Brevik Tower was designed by architect Imra Solenne.\n"}
TEMPERATURE = 0.7


class ScriptedNativeEngine(NativeEngine):
    """`NativeEngine` whose sampler emits `scripts[uid][agent_turn]` (then EOS); all else
    (prefill, KV-cache decoding, stop strings, masks) is the real engine's."""

    def __init__(self, model, tokenizer, scripts):
        super().__init__(model, tokenizer)
        self.scripts = {u: [tokenizer.encode(t, add_special_tokens=False) for t in turns]
                        for u, turns in scripts.items()}
        self.forced: list[list[int]] = []
        self.t = 0

    def _decode(self, cs, sp, gen, rule):              # one chunk's decoding (from cs.steps on)
        self.forced = [self.scripts[s["uid"]][s["agent_turn"]] for s in cs.prompts.samples]
        self.t = cs.steps
        return super()._decode(cs, sp, gen, rule)

    def _sample(self, logits, sp, gen, suppress=None):     # the script decides; no EOS suppression
        tok = torch.tensor([f[self.t] if self.t < len(f) else self.eos_ids[0] for f in self.forced])
        logp = torch.log_softmax(logits.float() / sp.temperature, -1).gather(-1, tok[:, None])[:, 0]
        self.t += 1
        return tok, logp


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def tiny_model(tokenizer, tmp_path_factory):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed

    hf = make_tiny_hf(tmp_path_factory.mktemp("agent_tiny"), "llama", vocab_size=len(tokenizer),
                      max_position_embeddings=512)
    init_distributed(tp=1, pp=1)
    torch.manual_seed(0)
    return load_checkpoint(hf, layer_spec="local")


@pytest.fixture
def rollout(tokenizer, retriever, tiny_model):
    cfg = AgentConfig(enable=True, max_turns=2, retriever_url=retriever.url, topk=1, timeout_s=5.0,
                      retries=1, backoff_s=0.01)
    agent = AgentRolloutEngine(ScriptedNativeEngine(tiny_model, tokenizer, SCRIPTS), tokenizer, cfg)
    batch = prompt_batch(tokenizer, QUESTIONS, ANSWERS)
    out = agent.generate(batch, SamplingParams(n=1, max_new_tokens=40, temperature=TEMPERATURE, seed=0))
    return agent, out


def expected_row(tok, uid):
    """(ids, response_mask, info_mask) of one sample: turn 0 up to `</search>`, the
    observation, turn 1 up to `</answer>`."""
    g0 = enc(tok, SCRIPTS[uid][0].split("</search>")[0] + "</search>")
    g1 = enc(tok, SCRIPTS[uid][1].split("</answer>")[0] + "</answer>")
    inj = enc(tok, OBS_OPEN) + enc(tok, OBS[uid]) + enc(tok, OBS_CLOSE)
    ids = g0 + inj + g1
    gen = [1.0] * len(g0) + [0.0] * len(inj) + [1.0] * len(g1)
    return ids, gen, [1.0 - g for g in gen]


def test_native_engine_rollout_injects_search_results_between_forced_turns(tokenizer, rollout):
    _, out = rollout
    for r, uid in enumerate(QUESTIONS):
        ids, gen, info = expected_row(tokenizer, uid)
        n = out.samples[r]["response_length"]
        assert n == len(ids)
        assert out["response_ids"][r, :n].tolist() == ids
        assert out["info_mask"][r, :n].tolist() == info
        assert out["response_mask"][r, :n].tolist() == gen           # state masking: loss mask = generated
        assert out["response_ids"][r, n:].eq(tokenizer.pad_token_id).all()
        assert out["response_mask"][r, n:].sum() == 0 and out["info_mask"][r, n:].sum() == 0
        s = out.samples[r]
        assert (s["n_tool_calls"], s["n_tool_errors"], s["stop_reason"]) == (1, 0, "answer")
        assert s["turns"][0]["query"] == SCRIPTS[uid][0].split("<search>")[1].split("</search>")[0]


def test_native_engine_rollout_logprobs_match_the_trainers_recompute(tokenizer, rollout, tiny_model):
    from megatron_rl.trainer.policy import Policy

    _, out = rollout
    policy = Policy(tiny_model, micro_batch_size=2, temperature=TEMPERATURE)
    recomputed, _ = policy.compute_logprobs(out)
    gen, info = out["response_mask"], out["info_mask"]
    rollout_lp = out["rollout_logprob"]
    assert (rollout_lp * info).abs().sum() == 0                          # injected tokens: 0
    assert (rollout_lp * gen).lt(0).sum() == gen.sum()                   # generated tokens: real log-probs
    # the model saw the observation as context in both passes, so the log-probs agree
    assert ((recomputed - rollout_lp) * gen).abs().max() < 1e-4


def test_native_engine_rollout_reward_and_loss_mask_token_by_token(tokenizer, rollout):
    from megatron_rl.rewards.token_rewards import to_token_rewards
    from megatron_rl.trainer.microbatch import make_microbatches

    _, out = rollout
    scores = [search_qa_reward("", s) for s in out.samples]
    assert scores == [1.0, 1.0]
    token_rewards = to_token_rewards(scores, out["response_mask"])
    for r, uid in enumerate(QUESTIONS):
        ids, gen, _ = expected_row(tokenizer, uid)
        expected = [0.0] * len(ids)
        expected[len(ids) - 1] = 1.0                                     # on `</answer>`, a generated token
        assert token_rewards[r, : len(ids)].tolist() == expected
    mb = make_microbatches(out, micro_batch_size=2)[0]
    p = out["prompt_ids"].shape[1]
    # the model attends to every response token (observations included) but the loss
    # sees only generated ones
    assert mb["attention_mask"][:, p:].tolist() == ((out["response_mask"] + out["info_mask"]) > 0).long().tolist()
    assert mb["response_mask"].tolist() == out["response_mask"].tolist()


def test_native_engine_rollout_without_state_masking_trains_on_observations(tokenizer, retriever, tiny_model):
    cfg = AgentConfig(enable=True, max_turns=2, retriever_url=retriever.url, topk=1, state_masking=False)
    agent = AgentRolloutEngine(ScriptedNativeEngine(tiny_model, tokenizer, SCRIPTS), tokenizer, cfg)
    out = agent.generate(prompt_batch(tokenizer, QUESTIONS, ANSWERS), SamplingParams(max_new_tokens=40, seed=0))
    n = out.samples[0]["response_length"]
    assert out["response_mask"][0, :n].tolist() == [1.0] * n
    assert out["info_mask"][0, :n].sum() > 0
