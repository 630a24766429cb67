"""A discriminative reward model: an HF `*ForSequenceClassification` checkpoint (one label)
as a frozen Megatron role.

    init_distributed(tp=..., pp=...)
    rm = load_reward_model(path)                    # Llama / Qwen2 / Qwen3 ForSequenceClassification
    rm.score(input_ids, attention_mask)             # float32 [batch], on every rank

The trunk is a Megatron `GPTModel` (any TP/PP: the forward runs through Megatron's own
schedule, like the GAD discriminator's scoring), HF's `score.weight` [1, h] becomes the
scalar `value_head` of the last stage (its bias held at zero: HF's head has none). The
score of a row is the head at its last real token, so right and left padding give the
same score (positions count real tokens only). The LM head is never used: the trunk is
built with tied embeddings so a checkpoint without `lm_head.weight` loads.

`score_rows` re-renders prompt + response with the reward model's own tokenizer and chat
template when they differ from the policy's (`reward.model.template`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from megatron_rl.models.offload import Offloadable

SEQ_CLS_ARCHITECTURES = {"LlamaForSequenceClassification": "LlamaForCausalLM",
                         "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
                         "Qwen3ForSequenceClassification": "Qwen3ForCausalLM"}
TEMPLATES = ("auto", "tokens", "chat", "text")


def trunk_hf_config(path: str | os.PathLike) -> dict:
    """The checkpoint's config.json as the config of its causal-LM trunk (tied embeddings:
    no `lm_head.weight` is needed); refuses other architectures and label counts by name."""
    f = Path(path) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"reward.model.path={path}: no config.json (an HF *ForSequenceClassification "
                                f"directory is expected)")
    cfg = json.loads(f.read_text())
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SEQ_CLS_ARCHITECTURES:
        raise ValueError(f"{f}: architectures={archs!r}; a reward model must be one of "
                         f"{sorted(SEQ_CLS_ARCHITECTURES)}")
    labels = cfg.get("num_labels", len(cfg.get("id2label") or {0: 0}))
    if labels != 1:
        raise ValueError(f"{f}: num_labels={labels}; a reward model scores with one label (score.weight [1, h])")
    return {**cfg, "architectures": [SEQ_CLS_ARCHITECTURES[archs[0]]], "tie_word_embeddings": True}


def _microbatches(ids: torch.Tensor, am: torch.Tensor, mbs: int, device) -> list[dict]:
    """Fixed `[mbs, seq]` micro-batches (the pipeline schedule needs one shape); a short
    last one repeats its first row (its scores are dropped)."""
    out = []
    for start in range(0, ids.shape[0], mbs):
        idx = list(range(start, min(start + mbs, ids.shape[0])))
        idx += [idx[0]] * (mbs - len(idx))
        t = torch.as_tensor(idx)
        out.append({"input_ids": ids[t].to(device), "attention_mask": am[t].to(device)})
    return out


class RewardModel(Offloadable):
    """Frozen trunk + score head. `offload()` / `onload()` move the weights to host memory
    between passes (`reward.model.offload`); `score` onloads for its pass when needed.
    Frozen and rebuilt from its path, it has no checkpoint state."""

    def __init__(self, chunks: list, tokenizer, path: str, micro_batch_size: int = 4, offload: bool = False):
        if micro_batch_size <= 0:
            raise ValueError(f"reward.model.micro_batch_size must be > 0, got {micro_batch_size}")
        self.chunks = chunks
        self.tokenizer = tokenizer
        self.path = str(path)
        self.mbs = micro_batch_size
        self.offloader = None
        self.template = "auto"              # reward.model.template; set by build_reward_model
        self.normalize = "none"             # reward.model.normalize
        self.policy_tokenizer = None
        if offload:
            from megatron_rl.models.offload import WeightOffloader
            self.offloader = WeightOffloader(chunks)
            self.offloader.offload()

    # --- lifecycle (trainer/roles.py Role) ---------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_checkpoint(self, ckpt_dir, name: str) -> None:
        pass        # frozen: rebuilt from reward.model.path

    def load_checkpoint(self, ckpt_dir, name: str) -> None:
        pass

    # --- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """float32 [B] score at each row's last real token, on every rank (call on every
        rank of the model-parallel group with the same rows)."""
        from megatron_rl.models.schedule import run_microbatches
        from megatron_rl.models.value_head import last_token_index, value_forward
        from megatron_rl.parallel.pipeline import broadcast_from_last_stage

        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"reward model: input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be [batch, seq]")
        n = input_ids.shape[0]
        if n == 0:
            return torch.zeros(0)
        with self.onloaded():
            device = next(self.chunks[0].parameters()).device
            mbs = _microbatches(input_ids.long(), attention_mask.long(), self.mbs, device)

            def last(mb, out):
                s = out.gather(1, last_token_index(mb["attention_mask"])[:, None]).squeeze(1)
                return out.sum() * 0, {"s": s.float().cpu()}

            res = run_microbatches(self.chunks, mbs, lambda m, mb: value_forward(m, mb["input_ids"], mb["attention_mask"]),
                                   last, forward_only=True)
        s = torch.cat([r["s"] for r in res])[:n] if res else None
        return broadcast_from_last_stage(s, (n,))

    def score_rows(self, batch, rows: Sequence[int], responses: Sequence[str]) -> list[float]:
        """Scores of `batch` rows `rows` (a rolled-out Batch; `responses` its decoded texts):
        the policy's ids as they are (`template: tokens`) or re-rendered in this model's
        tokenizer; z-scored over every DP rank's rows with `normalize: batch` (call on every
        rank, even with no rows)."""
        rows = list(rows)
        template = resolve_template(self.template, self.tokenizer, self.policy_tokenizer)
        if template == "tokens":
            ids, am = policy_inputs(batch, rows)
        else:
            samples = [batch.samples[i] for i in rows]
            ids, am = self.render([s.get("messages") or [{"role": "user", "content": s.get("prompt_text", "")}]
                                   for s in samples], [s.get("prompt_text", "") for s in samples],
                                  [responses[i] for i in rows], template)
        scores = self.score(ids, am) if rows else torch.zeros(0)
        if self.normalize == "batch":
            scores = dp_zscore(scores)
        return scores.tolist()

    def render(self, messages: Sequence[list[dict]], prompt_texts: Sequence[str], responses: Sequence[str],
               template: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (ids, mask) of prompt + response in this model's tokenizer:
        `chat` applies its chat template to the messages plus an assistant turn; `text`
        tokenizes the policy's rendered prompt text followed by the response."""
        tok = self.tokenizer
        rows = []
        for msgs, ptext, resp in zip(messages, prompt_texts, responses):
            if template == "chat":
                if getattr(tok, "chat_template", None) is None:
                    raise ValueError(f"reward.model.template=chat: the tokenizer in {self.path} has no chat_template")
                text = tok.apply_chat_template(list(msgs) + [{"role": "assistant", "content": resp}],
                                               tokenize=False)
                rows.append(list(tok.encode(text, add_special_tokens=False)))
            elif template == "text":
                rows.append(list(tok.encode(ptext + resp)))
            else:
                raise ValueError(f"reward.model.template must be one of {TEMPLATES} to render, got {template!r}")
        return pad_right(rows, tok.pad_token_id if tok.pad_token_id is not None else 0)


def policy_inputs(batch, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt ++ response ids of `rows` and their real-token mask (left-padded prompt,
    right-padded response: the score is read at the last real token either way)."""
    t = torch.as_tensor(list(rows), dtype=torch.long)
    resp_attn = batch.get("response_attention_mask")
    if resp_attn is None:
        resp_attn = (batch["response_mask"] > 0).long()
    ids = torch.cat([batch["prompt_ids"][t], batch["response_ids"][t]], 1)
    am = torch.cat([batch["prompt_mask"][t].long(), resp_attn[t].long()], 1)
    return ids, am


def dp_zscore(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(s - mean) / std over the scores of every data-parallel rank (one all-reduce)."""
    import torch.distributed as dist

    stats = torch.tensor([scores.sum().item(), (scores.double() ** 2).sum().item(), float(scores.numel())],
                         dtype=torch.float64)
    if dist.is_initialized():
        from megatron.core import parallel_state as mpu
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        stats = stats.to(dev)
        dist.all_reduce(stats, group=mpu.get_data_parallel_group())
        stats = stats.cpu()
    total, sq, n = stats.tolist()
    if n == 0:
        return scores
    mean = total / n
    std = max(sq / n - mean * mean, 0.0) ** 0.5
    return ((scores.double() - mean) / (std + eps)).float()


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    am = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        am[i, :len(r)] = 1
    return ids, am


def same_tokenizer(a, b) -> bool:
    """Same vocabulary and chat template: the policy's token ids can be scored as they are."""
    return (a is not None and b is not None and a.get_vocab() == b.get_vocab()
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))


def resolve_template(template: str, rm_tokenizer, policy_tokenizer) -> str:
    """`auto` -> `tokens` when the tokenizers agree, else `chat` (or `text` without a chat template)."""
    if template not in TEMPLATES:
        raise ValueError(f"reward.model.template must be one of {'|'.join(TEMPLATES)}, got {template!r}")
    if template == "tokens" and policy_tokenizer is not None and rm_tokenizer is not None \
            and rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ValueError("reward.model.template=tokens: the reward model's tokenizer has another vocabulary than "
                         "the policy's; use template auto, chat or text")
    if template != "auto":
        return template
    if same_tokenizer(rm_tokenizer, policy_tokenizer):
        return "tokens"
    return "chat" if getattr(rm_tokenizer, "chat_template", None) else "text"


@torch.no_grad()
def load_reward_model(path: str | os.PathLike, *, micro_batch_size: int = 4, dtype: str = "float32",
                      layer_spec: str = "auto", offload: bool = False, tokenizer: bool = True) -> RewardModel:
    """This rank's frozen reward model for the current parallel layout (call
    `megatron_rl.parallel.init_distributed(...)` first, on every rank)."""
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.models.hf_io import HFTensorReader
    from megatron_rl.models.loading import load_hf_weights
    from megatron_rl.models.provider import build_model_chunks
    from megatron_rl.models.value_head import attach_value_head

    arch = arch_from_hf_config(trunk_hf_config(path))
    if arch.is_moe:
        raise ValueError(f"reward.model.path={path}: mixture-of-experts reward models are not supported")
    chunks = build_model_chunks(arch, dtype=dtype, layer_spec=layer_spec)
    reader = HFTensorReader(path)
    load_hf_weights(chunks, reader, arch)
    head = attach_value_head(chunks[-1])
    if head is not None:
        if "score.weight" not in reader:
            raise KeyError(f"{path}: no 'score.weight' tensor (the sequence-classification head)")
        w = reader.get("score.weight")
        if tuple(w.shape) != (1, arch.hidden_size):
            raise ValueError(f"{path}: score.weight has shape {tuple(w.shape)}, expected (1, {arch.hidden_size})")
        head.weight.copy_(w.to(head.weight))
        head.bias.zero_()
    for c in chunks:
        for p in c.parameters():
            p.requires_grad_(False)
        c.eval()
    tok = None
    if tokenizer:
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(path)
    return RewardModel(chunks, tok, str(path), micro_batch_size=micro_batch_size, offload=offload)


def build_reward_model(cfg, policy_tokenizer, *, dtype: str = "float32", layer_spec: str = "auto",
                       offload: bool | None = None) -> RewardModel:
    """The role from `reward.model` (a `RewardModelConfig`); `offload` as the run plan placed it
    (default `cfg.offload`). The template is resolved here, so a `tokens` template whose
    vocabulary differs fails at start-up."""
    rm = load_reward_model(cfg.path, micro_batch_size=cfg.micro_batch_size, dtype=dtype, layer_spec=layer_spec,
                           offload=cfg.offload if offload is None else offload)
    rm.template, rm.normalize, rm.policy_tokenizer = cfg.template, cfg.normalize, policy_tokenizer
    resolve_template(cfg.template, rm.tokenizer, policy_tokenizer)
    return rm
