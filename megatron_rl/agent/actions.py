"""The tag language between policy and tools: `<tool>query</tool>`, `<answer>...</answer>`,
and what the loop injects back (`<information>...</information>`, a corrective note)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

ANSWER = "answer"
OBS_OPEN = "\n\n<information>"
OBS_CLOSE = "</information>\n\n"
INVALID_ACTION_MESSAGE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n")


@dataclass(frozen=True)
class Action:
    name: str        # a tool name or "answer"
    content: str     # the text between the tags, stripped


@lru_cache(maxsize=32)
def _pattern(names: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"<({alternatives})>(.*?)</\1>", re.DOTALL)


def parse_action(text: str, tools: list[str] | tuple[str, ...]) -> Action | None:
    """The first complete `<name>...</name>` in one turn's generated text, name in
    `tools` or "answer"; None when there is none (an invalid action). Only the policy's
    own turn is parsed, so tags inside retrieved text can never trigger a tool."""
    m = _pattern(tuple(tools) + (ANSWER,)).search(text)
    return Action(m.group(1), m.group(2).strip()) if m else None


def stop_strings(tools: list[str] | tuple[str, ...]) -> list[str]:
    """Closing tags that end a generation turn (passed as `SamplingParams.stop`)."""
    return [f"</{n}>" for n in (*tools, ANSWER)]


def last_answer(text: str) -> str | None:
    """Content of the last `<answer>...</answer>` in `text` (None if absent)."""
    found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return found[-1].strip() if found else None
