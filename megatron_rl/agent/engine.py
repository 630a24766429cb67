"""`AgentRolloutEngine`: a multi-turn tool loop that wraps any `RolloutEngine`.

Each turn the inner engine continues every unfinished sample (prompt + everything so
far, n=1) until a closing tag (`</search>`, `</answer>`, ...) or EOS. Tool actions of
all samples are answered in one `batch_call` per tool and injected as
`\\n\\n<information>...</information>\\n\\n`; a turn without a valid action gets a short
corrective note. Injected tokens carry `info_mask` 1, `rollout_logprob` 0 and (with
`state_masking`) `response_mask` 0: the policy is never trained to predict tool output.
After `max_turns` tool turns one last turn runs without tools. The wrapper speaks the
same protocol, so it composes with steering or any other wrapper. The inner engine
sees each row's sample dict plus `agent_turn` and `agent_index` (its row in the
expanded batch), e.g. for per-sample seeding or steering strengths.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

import torch

from megatron_rl.agent.actions import (ANSWER, INVALID_ACTION_MESSAGE, OBS_CLOSE, OBS_OPEN,
                                       parse_action, stop_strings)
from megatron_rl.agent.config import AgentConfig
from megatron_rl.agent.metrics import agent_metrics
from megatron_rl.agent.tools import ToolFailure, build_tools, is_failure
from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import RolloutEngine, SamplingParams


@dataclass
class _Episode:
    """One sample's growing response; the three lists stay the same length."""
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    injected: list[float] = field(default_factory=list)   # 1 = tool / loop text
    logprob: list[float] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    stop_reason: str | None = None                        # answer | eos | max_turns | length
    answer: str | None = None
    tool_calls: int = 0
    tool_errors: int = 0
    invalid_actions: int = 0

    @property
    def done(self) -> bool:
        return self.stop_reason is not None


class AgentRolloutEngine:
    def __init__(self, engine: RolloutEngine, tokenizer, config: AgentConfig,
                 tools: dict | None = None, pad_token_id: int | None = None,
                 eos_token_ids: Iterable[int] | None = None):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.tools = build_tools(config) if tools is None else dict(tools)
        self.pad_id = _first_not_none(pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
        eos = eos_token_ids if eos_token_ids is not None else [tokenizer.eos_token_id]
        self.eos_ids = {int(t) for t in eos if t is not None}
        self._obs_open, self._obs_close = self._encode(OBS_OPEN), self._encode(OBS_CLOSE)
        self._invalid = self._encode(INVALID_ACTION_MESSAGE)
        self.last_metrics: dict[str, float] = {}
        self._has_logprob = True    # false once the inner engine omits rollout_logprob

    def __getattr__(self, name):
        # sync_weights / sleep / wake / update_weights belong to the wrapped engine.
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    # -- protocol ---------------------------------------------------------------------
    def generate(self, batch: Batch, sampling: SamplingParams) -> Batch:
        rows = batch.repeat_interleave(sampling.n)
        for i, s in enumerate(rows.samples):
            s["group"] = s.get("uid", i // sampling.n)
        prompts = [ids[m.bool()].tolist() for ids, m in zip(rows["prompt_ids"], rows["prompt_mask"])]
        episodes = [_Episode(p) for p in prompts]
        self._has_logprob = True
        stops = list(dict.fromkeys([*sampling.stop, *stop_strings(list(self.tools))]))
        for turn in range(self.config.max_turns + 1):
            active = [i for i, e in enumerate(episodes) if not e.done]
            if not active:
                break
            final = turn == self.config.max_turns
            self._generate_turn(rows, episodes, active, sampling, stops, turn)
            calls: dict[str, list[int]] = {}
            for i in active:
                action = self._settle_turn(episodes[i], final)
                if action is not None:
                    calls.setdefault(action, []).append(i)
            for name, idx in calls.items():
                self._run_tool(name, [episodes[i] for i in idx])
        out = self._to_batch(rows, episodes)
        self.last_metrics = agent_metrics(out.samples)
        return out

    def update_weights(self, named_tensors) -> None:
        self.engine.update_weights(named_tensors)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    # -- one turn ---------------------------------------------------------------------
    def _generate_turn(self, rows: Batch, episodes: list[_Episode], active: list[int],
                       sampling: SamplingParams, stops: list[str], turn: int) -> None:
        budget = self.config.max_response_length
        contexts = [episodes[i].prompt + episodes[i].tokens for i in active]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(active), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for r, c in enumerate(contexts):       # left-padded, as the protocol wants prompts
            ids[r, width - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[r, width - len(c):] = 1
        samples = [dict(rows.samples[i], agent_turn=turn, agent_index=i) for i in active]
        left = max(budget - len(episodes[i].tokens) for i in active)
        seed = None if sampling.seed is None else sampling.seed + turn    # fresh noise per turn
        turn_sampling = replace(sampling, n=1, stop=stops, seed=seed,
                                max_new_tokens=min(sampling.max_new_tokens, left))
        out = self.engine.generate(Batch({"prompt_ids": ids, "prompt_mask": mask}, samples), turn_sampling)
        if len(out) != len(active):
            raise RuntimeError(f"inner engine {type(self.engine).__name__} returned {len(out)} rows "
                               f"for {len(active)} prompts at n=1 (agent turn {turn})")
        lengths = (out["response_mask"] > 0).sum(1).tolist()
        logprob = out.get("rollout_logprob")
        self._has_logprob &= logprob is not None
        for r, i in enumerate(active):
            e, n = episodes[i], int(lengths[r])
            gen = out["response_ids"][r, :n].tolist()[: budget - len(e.tokens)]
            e.tokens += gen
            e.injected += [0.0] * len(gen)
            e.logprob += logprob[r, : len(gen)].tolist() if logprob is not None else [0.0] * len(gen)
            e.turns.append({"turn": turn, "n_generated": len(gen), "n_injected": 0,
                            "text": self.tokenizer.decode(gen, skip_special_tokens=True),
                            "eos": bool(gen) and gen[-1] in self.eos_ids})

    def _settle_turn(self, e: _Episode, final: bool) -> str | None:
        """Decide what the turn just generated means; returns a tool name to call, if any."""
        rec = e.turns[-1]
        tools = [] if final else list(self.tools)
        action = parse_action(rec.pop("text"), list(self.tools))
        rec["action"] = action.name if action else "invalid"
        rec["query"] = action.content if action else None
        if action is not None and action.name == ANSWER:
            e.answer, e.stop_reason = action.content, "answer"
        elif len(e.tokens) >= self.config.max_response_length:
            e.stop_reason = "length"
        elif final:
            e.stop_reason = "max_turns"
        elif action is not None and action.name in tools:
            e.tool_calls += 1
            return action.name
        elif rec["eos"]:
            e.stop_reason = "eos"
        else:
            e.invalid_actions += 1
            self._inject(e, self._invalid)
        return None

    def _run_tool(self, name: str, episodes: list[_Episode]) -> None:
        queries = [e.turns[-1]["query"] for e in episodes]
        try:
            observations = self.tools[name].batch_call(queries)
            if len(observations) != len(queries):
                raise ValueError(f"returned {len(observations)} observations for {len(queries)} queries")
        except Exception as exc:    # a plug-in tool's bug costs observations, not the run
            observations = [ToolFailure(f"{name} error: {type(exc).__name__}: {exc}")] * len(queries)
        for e, obs in zip(episodes, observations):
            content = self._encode(str(obs))[: self.config.max_obs_length]
            rec = e.turns[-1]
            rec["observation"] = self.tokenizer.decode(content)
            rec["error"] = is_failure(obs)
            e.tool_errors += int(rec["error"])
            self._inject(e, self._obs_open + content + self._obs_close)

    def _inject(self, e: _Episode, ids: list[int]) -> None:
        ids = ids[: self.config.max_response_length - len(e.tokens)]
        e.tokens += ids
        e.injected += [1.0] * len(ids)
        e.logprob += [0.0] * len(ids)
        e.turns[-1]["n_injected"] += len(ids)
        if len(e.tokens) >= self.config.max_response_length:
            e.stop_reason = "length"

    # -- output -----------------------------------------------------------------------
    def _to_batch(self, rows: Batch, episodes: list[_Episode]) -> Batch:
        width = max(1, max(len(e.tokens) for e in episodes))
        shape = (len(episodes), width)
        response_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        response_mask, info_mask, logprob = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        for r, e in enumerate(episodes):
            n = len(e.tokens)
            info = torch.tensor(e.injected, dtype=torch.float32)
            response_ids[r, :n] = torch.tensor(e.tokens, dtype=torch.long)
            info_mask[r, :n] = info
            response_mask[r, :n] = 1.0 - info if self.config.state_masking else 1.0
            logprob[r, :n] = torch.tensor(e.logprob, dtype=torch.float32)
        tensors = dict(rows.tensors, response_ids=response_ids, response_mask=response_mask,
                       info_mask=info_mask)
        if self._has_logprob:
            tensors["rollout_logprob"] = logprob
        samples = []
        for s, e in zip(rows.samples, episodes):
            samples.append(dict(s, turns=e.turns, n_turns=len(e.turns), n_tool_calls=e.tool_calls,
                                n_tool_errors=e.tool_errors, n_invalid_actions=e.invalid_actions,
                                finished=e.stop_reason == "answer", stop_reason=e.stop_reason,
                                answer=e.answer, response_length=len(e.tokens)))
        return Batch(tensors, samples)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _first_not_none(*values):
    return next(v for v in values if v is not None)
