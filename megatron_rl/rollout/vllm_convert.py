"""Pure-Python pieces of the vLLM engine (no vLLM import): our `SamplingParams` to
vLLM's keyword arguments, padded prompts to token lists, vLLM `RequestOutput`s to a
`Batch` (with the routed experts of MoE routing replay), and the per-request steering groups.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import numpy as np
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.models.routing_replay import PROMPT_KEY, RESPONSE_KEY
from megatron_rl.rollout.protocol import SamplingParams


def vllm_sampling_kwargs(sp: SamplingParams, seed: int | None = None,
                         stop_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams`.

    logprobs=0 returns the sampled token's log-prob only (`flat_logprobs` was slower on the
    H200: 10.1 s vs 8.6 s for 131k tokens, docs/BENCHMARKS.md); `sp.logprobs` False asks
    for none (5.0 s).
    Stop strings stay in the
    text (`include_stop_str_in_output`) as in the native engine; top_k=0 is vLLM's "off"
    (our -1); greedy is temperature 0; `ignore_eos` / `min_new_tokens` map to vLLM's
    `ignore_eos` / `min_tokens`.
    """
    kw: dict[str, Any] = dict(n=sp.n, max_tokens=sp.max_new_tokens, seed=seed,
                              stop=list(sp.stop) or None, include_stop_str_in_output=True,
                              detokenize=bool(sp.stop), skip_special_tokens=False,
                              stop_token_ids=list(stop_token_ids) or None)
    if sp.logprobs:
        kw["logprobs"] = 0
    if sp.ignore_eos:
        kw["ignore_eos"] = True
    if sp.min_new_tokens:
        kw["min_tokens"] = int(sp.min_new_tokens)
    if sp.greedy or sp.temperature == 0.0:
        kw.update(temperature=0.0, top_p=1.0, top_k=0)
    else:
        kw.update(temperature=float(sp.temperature), top_p=float(sp.top_p),
                  top_k=int(sp.top_k) if sp.top_k and sp.top_k > 0 else 0)
    return kw


def request_seeds(sp: SamplingParams, num_prompts: int) -> list[int | None]:
    """One seed per prompt, n apart (vLLM derives its n children's seeds by adding the child
    index), from a 62-bit mix of `sp.seed`: the step seed grows by 1 per step, so a plain
    `seed + i * n` gave prompt i-1 of step s+n the noise of prompt i of step s."""
    if sp.seed is None:
        return [None] * num_prompts
    base = _mix64(int(sp.seed)) & (2**62 - 1)
    return [base + i * max(sp.n, 1) for i in range(num_prompts)]


def _mix64(x: int) -> int:
    """splitmix64's finaliser: distinct, well-spread 64-bit values for consecutive seeds."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def prompt_token_lists(batch: Batch) -> list[list[int]]:
    """Left-padded `prompt_ids` without their padding (vLLM takes ragged token lists)."""
    ids, mask = batch["prompt_ids"], batch["prompt_mask"].bool()
    return [ids[i][mask[i]].tolist() for i in range(len(batch))]


def steering_groups(batch: Batch, by_prompt_len: bool) -> list[tuple[tuple | None, int | None, list[int]]]:
    """(strength row or None, prompt length or None, row indices): one vLLM call each.

    Rows share a call when their `steer_strengths` rows are equal (and, for scope
    prompt/generated, their prompt lengths); order of first appearance is kept.
    """
    strengths = batch.get("steer_strengths")
    lens = batch["prompt_mask"].sum(-1).tolist() if by_prompt_len else None
    groups: dict[tuple, list[int]] = {}
    for i in range(len(batch)):
        s = tuple(float(x) for x in torch.as_tensor(strengths[i]).reshape(-1).tolist()) if strengths is not None else None
        key = (s, int(lens[i]) if lens is not None else None)
        groups.setdefault(key, []).append(i)
    return [(s, p, idx) for (s, p), idx in groups.items()]


def token_logprobs(completion) -> list[float]:
    """Log-probs of a `CompletionOutput`'s own tokens (vLLM gives one dict per position)."""
    ids, lps = list(completion.token_ids), completion.logprobs
    if lps is None:
        raise RuntimeError("vLLM returned no log-probs for a completion: SamplingParams.logprobs must be 0")
    if hasattr(lps, "start_indices"):          # vLLM's FlatLogprobs: one flat list per field
        return _flat_token_logprobs(ids, lps)
    if len(lps) != len(ids):
        raise RuntimeError(f"vLLM returned {len(lps)} log-prob entries for {len(ids)} tokens")
    try:                                       # one comprehension per row: 512 x 256 in ~30 ms less
        values = [d[tok] for tok, d in zip(ids, lps)]
    except KeyError:
        t, tok, d = next((t, tok, d) for t, (tok, d) in enumerate(zip(ids, lps)) if tok not in d)
        raise RuntimeError(f"vLLM log-probs at position {t} lack the sampled token {tok} (keys {list(d)[:4]})") from None
    if values and hasattr(values[0], "logprob"):
        return list(map(_LOGPROB, values))
    return [float(getattr(v, "logprob", v)) for v in values]


_LOGPROB = operator.attrgetter("logprob")


def _flat_token_logprobs(ids: list[int], flat) -> list[float]:
    if len(flat.start_indices) != len(ids):
        raise RuntimeError(f"vLLM returned {len(flat.start_indices)} log-prob positions for {len(ids)} tokens")
    out = []
    for t, tok in enumerate(ids):
        lo, hi = flat.start_indices[t], flat.end_indices[t]
        for j in range(lo, hi):
            if flat.token_ids[j] == tok:
                out.append(float(flat.logprobs[j]))
                break
        else:
            raise RuntimeError(f"vLLM log-probs at position {t} lack the sampled token {tok} "
                               f"(keys {flat.token_ids[lo:hi][:4]})")
    return out


def completion_routing(completion, prompt_len: int, moe_layers: Sequence[int]) -> torch.Tensor:
    """vLLM 0.26's `CompletionOutput.routed_experts` -> `[rows, L, k]` int16 `expert id + 1`.

    vLLM (`enable_return_routed_experts`) returns one row per token it fed: the whole prompt
    (prefill), then the token fed at each decode step, so `prompt_len + len(token_ids) - 1` rows
    (the last sampled token is never fed); columns are all `num_hidden_layers` decoder layers
    (dense layers hold zeros), values logical expert ids 0..E-1. `moe_layers` picks the MoE
    layers in the order of `models/routing_replay.py`'s L dimension."""
    routed = getattr(completion, "routed_experts", None)
    if routed is None:
        raise RuntimeError("vLLM returned no CompletionOutput.routed_experts (model.moe.routing_replay needs "
                           "vllm.LLM(enable_return_routed_experts=True), vLLM >= 0.26)")
    t = torch.from_numpy(np.asarray(routed, dtype=np.int32))
    rows, width = t.shape[0] if t.dim() == 3 else -1, prompt_len + len(completion.token_ids)
    if t.dim() != 3 or not prompt_len <= rows <= width:
        raise RuntimeError(f"vLLM routed_experts of shape {tuple(t.shape)} for a {prompt_len}-token prompt and "
                           f"{len(completion.token_ids)} generated tokens: expected [{prompt_len}..{width}, "
                           "num_hidden_layers, top_k]")
    if max(moe_layers) >= t.shape[1]:
        raise RuntimeError(f"vLLM routed_experts cover {t.shape[1]} layers, but MoE layer {max(moe_layers)} "
                           "was expected (the trainer's and vLLM's checkpoints differ?)")
    return (t[:, list(moe_layers)] + 1).to(torch.int16)


def _routing_tensors(expanded: Batch, comps: list, widths: tuple[int, int], moe_layers: Sequence[int]):
    """`prompt_routed_experts` `[B, P, L, k]` (left-padded) and `response_routed_experts`
    `[B, R, L, k]` (right-padded), 0 = not recorded, from each row's completion."""
    p_width, r_width = widths
    lens = expanded["prompt_mask"].sum(-1).long().tolist()
    per_row = [completion_routing(c, plen, moe_layers) for c, plen in zip(comps, lens)]
    ks = {r.shape[-1] for r in per_row}
    if len(ks) > 1:
        raise RuntimeError(f"vLLM routed_experts with different top-k across completions: {sorted(ks)}")
    k = ks.pop() if ks else 1
    prompt = torch.zeros(len(comps), p_width, len(moe_layers), k, dtype=torch.int16)
    response = torch.zeros(len(comps), r_width, len(moe_layers), k, dtype=torch.int16)
    for b, (r, plen) in enumerate(zip(per_row, lens)):
        prompt[b, p_width - plen:] = r[:plen]
        response[b, : r.shape[0] - plen] = r[plen:]
    return prompt, response


def outputs_to_batch(batch: Batch, outputs: Sequence, n: int, pad_id: int, logprobs: bool = True,
                     moe_layers: Sequence[int] | None = None) -> Batch:
    """`outputs[i]` (a `RequestOutput` with `n` completions) for prompt row i -> a Batch with
    n adjacent rows per prompt in the native engine's layout (see `rollout/protocol.py`);
    without `logprobs` (not asked for) the batch has no `rollout_logprob`. With `moe_layers`
    (routing replay: the MoE layers' global indices) each completion's `routed_experts` become
    `prompt_routed_experts` / `response_routed_experts` (see `completion_routing`)."""
    if len(outputs) != len(batch):
        raise ValueError(f"{len(outputs)} vLLM outputs for {len(batch)} prompts")
    expanded = batch.repeat_interleave(n) if n > 1 else batch.select(range(len(batch)))
    seqs: list[list[int]] = []
    lps: list[list[float]] = []
    completions: list = []
    for i, out in enumerate(outputs):
        comps = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
        if len(comps) != n:
            raise RuntimeError(f"vLLM returned {len(comps)} completions for prompt {i}, expected n={n}")
        for j, c in enumerate(comps):
            seqs.append(list(c.token_ids))
            completions.append(c)
            lps.append(token_logprobs(c) if logprobs else [])
            s = expanded.samples[i * n + j]
            s.setdefault("group", s.get("uid", i))
            s["finish_reason"] = getattr(c, "finish_reason", None)
    b, width = len(seqs), max((len(s) for s in seqs), default=0)
    # one tensor from right-padded lists, not one small tensor per row (half the time for 512 x 256)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long).reshape(b, width)
    logprob = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in lps], dtype=torch.float32).reshape(b, width) \
        if logprobs else torch.zeros(b, width)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    tensors = {"prompt_ids": expanded["prompt_ids"], "prompt_mask": expanded["prompt_mask"],
               "response_ids": ids, "response_mask": mask, "response_attention_mask": mask.long()}
    if logprobs:
        tensors["rollout_logprob"] = logprob * mask
    if moe_layers is not None:
        widths = (expanded["prompt_ids"].shape[1], width)
        tensors[PROMPT_KEY], tensors[RESPONSE_KEY] = _routing_tensors(expanded, completions, widths, moe_layers)
    out = Batch(tensors, expanded.samples)
    for k, v in expanded.tensors.items():
        if k not in out.tensors and not k.startswith("response"):
            out[k] = v
    return out
