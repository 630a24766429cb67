"""Turn a record's prompt field into token ids: messages, chat template, truncation."""
from __future__ import annotations

from typing import Any

from megatron_rl.data.readers import DataError, Record


def to_messages(record: Record, prompt_key: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The prompt as chat messages; plain text becomes one user message."""
    if prompt_key not in record.fields:
        raise DataError(f"{record.where}: missing prompt key '{prompt_key}'; "
                        f"record has keys {sorted(record.fields)}")
    prompt = record.fields[prompt_key]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt and all(_is_message(m) for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise DataError(f"{record.where}: field '{prompt_key}' must be a string or a non-empty list of "
                        f"{{'role': str, 'content': str}} messages, got {_describe(prompt)}")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _describe(x: Any) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def render_prompt(tokenizer, messages: list[dict[str, str]], use_chat_template: bool,
                  chat_template_kwargs: dict | None = None) -> str:
    """The prompt text the model sees. Without a template the message contents are
    joined by newlines (a plain-text prompt stays exactly as written)."""
    if not use_chat_template:
        return "\n".join(m["content"] for m in messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("data.use_chat_template is true but the tokenizer has no chat_template; "
                         "set data.use_chat_template=false to use raw text")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))


def encode_prompt(tokenizer, text: str, use_chat_template: bool) -> list[int]:
    # A rendered template already holds its special tokens (BOS etc.); raw text gets the
    # tokenizer's usual ones.
    return list(tokenizer.encode(text, add_special_tokens=not use_chat_template))


def truncate(ids: list[int], max_len: int, policy: str, where: str) -> list[int]:
    """Apply the length policy: `left` keeps the last tokens, `right` the first."""
    if len(ids) <= max_len:
        return ids
    if policy == "left":
        return ids[-max_len:]
    if policy == "right":
        return ids[:max_len]
    raise DataError(f"{where}: prompt has {len(ids)} tokens, more than max_prompt_length={max_len} "
                    f"(set data.truncation to left|right or data.filter_overlong_prompts=true)")
