"""Context and instruction masks over prompt tokens, from `[start, end]` marker pairs.

Markers are matched in the prompt's text, rebuilt token by token (each token decoded
alone, special tokens kept), so the same code finds text markers such as
`<information>`/`</information>` or `<document>`/`</document>` whatever BPE merges
the tokenizer made around them, and special tokens such as `<|vision_start|>` /
`<|vision_end|>` of a vision-language chat template. Tokens strictly between a start
marker and its end marker are context; every other real prompt token is instruction,
except the tokens that overlap a marker (neither). A start with no end runs to the
end of the prompt (a truncated document is still a document).

A pair whose markers are both single special tokens of the tokenizer (the vision span
`<|vision_start|>` ... `<|vision_end|>` around a Qwen2-VL image's `<|image_pad|>` tokens)
is matched by token id instead, with the same rule: the image pads are the context and
the text around them the instruction, whatever a prompt's text happens to contain.
"""
from __future__ import annotations

from typing import Sequence

import torch


class ContextFinder:
    """`finder(prompt_ids, prompt_mask) -> (context_mask, instruction_mask)`, float `[B, P]`."""

    def __init__(self, tokenizer, markers: Sequence[Sequence[str]]):
        self.tokenizer = tokenizer
        pairs = [(str(a), str(b)) for a, b in markers]
        ids = [(special_token_id(tokenizer, a), special_token_id(tokenizer, b)) for a, b in pairs]
        self.id_markers = [(a, b) for a, b in ids if a is not None and b is not None]
        self.markers = [p for p, (a, b) in zip(pairs, ids) if a is None or b is None]
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        text = self._pieces.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._pieces[token_id] = text
        return text

    def __call__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = torch.zeros(prompt_ids.shape, dtype=torch.float32)
        ins = torch.zeros(prompt_ids.shape, dtype=torch.float32)
        for i in range(prompt_ids.shape[0]):
            cols = torch.nonzero(prompt_mask[i] > 0).squeeze(1).tolist()
            ids = [int(prompt_ids[i, c]) for c in cols]
            is_ctx, is_marker = id_span_labels(ids, self.id_markers)
            if self.markers:
                text_ctx, text_marker = span_labels([self.piece(t) for t in ids], self.markers)
                is_ctx = [a or b for a, b in zip(is_ctx, text_ctx)]
                is_marker = [a or b for a, b in zip(is_marker, text_marker)]
            for c, in_ctx, in_marker in zip(cols, is_ctx, is_marker):
                if in_ctx:
                    ctx[i, c] = 1.0
                elif not in_marker:
                    ins[i, c] = 1.0
        return ctx, ins


def special_token_id(tokenizer, marker: str) -> int | None:
    """The id of `marker` when it is one special (added) token of the tokenizer, else None."""
    if marker not in set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()):
        return None
    tid = tokenizer.convert_tokens_to_ids(marker)
    if tid is None or list(tokenizer.encode(marker, add_special_tokens=False)) != [tid]:
        return None
    return int(tid)


def id_span_labels(ids: Sequence[int], pairs: Sequence[tuple[int, int]]) -> tuple[list[bool], list[bool]]:
    """Per token: (inside a context span, a marker) for marker pairs given by token id;
    a start without an end runs to the end, as in `span_labels`."""
    is_ctx, is_marker = [False] * len(ids), [False] * len(ids)
    for start, end in pairs:
        i = 0
        while i < len(ids):
            if ids[i] != start:
                i += 1
                continue
            is_marker[i] = True
            j = i + 1
            while j < len(ids) and ids[j] != end:
                is_ctx[j] = not is_marker[j]
                j += 1
            if j < len(ids):
                is_marker[j] = True
                is_ctx[j] = False
            i = j + 1
    return is_ctx, is_marker


def span_labels(pieces: Sequence[str], markers: Sequence[tuple[str, str]]) -> tuple[list[bool], list[bool]]:
    """Per piece: (inside a context span, overlapping a marker), for the concatenated text."""
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    text = "".join(pieces)
    context_spans, marker_spans = [], []
    for start, end in markers:
        at = text.find(start)
        while at >= 0:
            body = at + len(start)
            close = text.find(end, body)
            stop = close if close >= 0 else len(text)
            marker_spans.append((at, body))
            context_spans.append((body, stop))
            if close < 0:
                break
            marker_spans.append((close, close + len(end)))
            at = text.find(start, close + len(end))
    is_ctx, is_marker = [], []
    for a, p in zip(starts, pieces):
        b = a + len(p)
        overlaps = lambda spans: any(a < hi and b > lo for lo, hi in spans)  # noqa: E731
        marker = overlaps(marker_spans)
        is_marker.append(marker)
        is_ctx.append(not marker and len(p) > 0 and overlaps(context_spans))
    return is_ctx, is_marker
