"""verl's RL data schema, read as it is written by verl's preprocessing scripts
(`examples/data_preprocess/gsm8k.py` and friends):

    prompt: [{"role": "user", "content": ...}]   data_source: "openai/gsm8k"   ability: "math"
    reward_model: {"style": "rule" | "model", "ground_truth": ...}   extra_info: {"split", "index", ...}

No config keys are needed: a record without a top-level `ground_truth` takes
`reward_model.ground_truth`; every field stays in the sample as it is, so a verl
reward function receives the row's own `extra_info`. `route_of(sample)` says who
scores a sample (`reward_model.style`): the rule rewards, or a reward model.
Images are supported (data/multimodal.py); a `videos` column is refused by name.
"""
from __future__ import annotations

from typing import Any

from megatron_rl.data.readers import DataError, Record

UNSUPPORTED_COLUMNS = ("videos",)
ROUTES = ("rule", "model")


def route_of(sample: dict[str, Any]) -> str:
    """"rule" or "model": verl's `reward_model.style` (rows without one are rule-scored);
    an unknown style is an error. "model" rows go to the reward model or judge
    (rewards/combine.py)."""
    rm = sample.get("reward_model")
    style = rm.get("style") if isinstance(rm, dict) else None
    if style is None:
        return "rule"
    if style not in ROUTES:
        raise DataError(f"sample {sample.get('uid', '?')}: reward_model.style must be one of {ROUTES}, "
                        f"got {style!r}")
    return style


def check_record(record: Record) -> None:
    """Refuse what the trainer cannot use yet, naming the file, row and column."""
    for column in UNSUPPORTED_COLUMNS:
        value = record.fields.get(column)
        if value is not None and value != [] and value != "":
            raise DataError(f"{record.where}: column '{column}' holds video inputs, which megatron-rl does not "
                            f"support (images are: data.image); drop the column or the row")


def ground_truth_of(fields: dict[str, Any]) -> tuple[bool, Any]:
    """(found, value): the top-level `ground_truth`, else verl's `reward_model.ground_truth`."""
    if "ground_truth" in fields:
        return True, fields["ground_truth"]
    rm = fields.get("reward_model")
    if isinstance(rm, dict) and "ground_truth" in rm:
        return True, rm["ground_truth"]
    return False, None


def verl_fields(record: Record) -> dict[str, Any]:
    """The record's fields with `ground_truth` filled in from `reward_model` (module docstring)."""
    check_record(record)
    fields = dict(record.fields)
    found, truth = ground_truth_of(fields)
    if found and "ground_truth" not in fields:
        fields["ground_truth"] = truth
    return fields
