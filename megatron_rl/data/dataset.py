"""The RL prompt dataset: records from files -> tokenized prompts + per-sample fields.

`dataset[i]` is a dict with `prompt_ids` (list[int], already truncated) and the
sample fields the rest of the step carries: `uid` (`file:line`, stable across
runs and shuffles; the file's name, or its path where two files share a name),
`messages` (the chat turns), `prompt_text` (what the model sees), `teacher_response`
when configured, and every other field of the record unchanged (`ground_truth`,
`data_source`, ...). A record's own `uid` field is replaced. verl's schema needs no keys:
`ground_truth` comes from `reward_model.ground_truth` when the record has no top-level
one, and video columns are refused by name (`data/verl_schema.py`). A record with images
(`data.image.key`, `<image>` placeholders) gets its prompt's image spans expanded to the
processor's token counts and `sample["images"]`, an `ImageInputs` (data/multimodal.py);
such a prompt is never truncated (cut image tokens would not match the pixels): an
over-long one is an error or, with `filter_overlong_prompts`, dropped.

Prompts are tokenized on access, so a large dataset opens fast; only
`filter_overlong_prompts` tokenizes everything up front (it must know the lengths).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_rl.data.config import DataConfig
from megatron_rl.data.multimodal import ImageEncoder, ImageInputs, place_images
from megatron_rl.data.prompts import encode_prompt, render_prompt, to_messages, truncate
from megatron_rl.data.readers import DataError, Record, read_records
from megatron_rl.data.verl_schema import check_record, verl_fields

log = logging.getLogger(__name__)


class RLDataset:
    def __init__(self, files: list[str], tokenizer, cfg: DataConfig):
        if not files:
            raise ValueError("RLDataset needs at least one file (data.train_files / data.val_files is empty)")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.records = read_records(list(files))
        for r in self.records:
            check_record(r)
        names = Counter(Path(r.path).name for r in {r.path: r for r in self.records}.values())
        self._short = {r.path: (Path(r.path).name if names[Path(r.path).name] == 1 else r.path)
                       for r in self.records}
        key = cfg.image.key
        has_images = any(r.fields.get(key) not in (None, [], "") for r in self.records)
        self.images = ImageEncoder(cfg.image, tokenizer) if has_images else None
        if cfg.filter_overlong_prompts:
            self._filter_overlong()

    def _filter_overlong(self) -> None:
        kept = [r for r in self.records if len(self._encode(r)[1]) <= self.cfg.max_prompt_length]
        dropped = len(self.records) - len(kept)
        if dropped:
            log.info("dropped %d of %d prompts longer than %d tokens", dropped, len(self.records),
                     self.cfg.max_prompt_length)
        if not kept:
            raise DataError(f"all {len(self.records)} prompts of {sorted(set(self._short))} are longer than "
                            f"max_prompt_length={self.cfg.max_prompt_length}")
        self.records = kept

    def __len__(self) -> int:
        return len(self.records)

    def uid(self, record: Record) -> str:
        return f"{self._short[record.path]}:{record.line}"

    def _encode(self, record: Record) -> tuple[list[dict], list[int], str, ImageInputs | None]:
        cfg = self.cfg
        messages = to_messages(record, cfg.prompt_key, cfg.system_prompt)
        images = self.images.images_of(record) if self.images is not None else []
        shown = place_images(messages, len(images), record.where) if images else messages
        text = render_prompt(self.tokenizer, shown, cfg.use_chat_template, cfg.chat_template_kwargs)
        ids = encode_prompt(self.tokenizer, text, cfg.use_chat_template)
        if not images:
            return messages, ids, text, None
        inputs = self.images.process(images)
        return messages, self.images.expand(ids, inputs, record.where), text, inputs

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        cfg = self.cfg
        messages, ids, text, images = self._encode(record)
        if images is not None and len(ids) > cfg.max_prompt_length:
            raise DataError(f"{record.where}: prompt with {images.num_images} image(s) has {len(ids)} tokens, "
                            f"more than max_prompt_length={cfg.max_prompt_length}; image prompts are never "
                            f"truncated: raise data.max_prompt_length, lower data.image.max_pixels or set "
                            f"data.filter_overlong_prompts=true")
        ids = truncate(ids, cfg.max_prompt_length, cfg.truncation, record.where)
        sample = {k: v for k, v in verl_fields(record).items() if k != cfg.prompt_key}
        sample.update(uid=self.uid(record), messages=messages, prompt_text=text, prompt_ids=ids)
        sample.pop(cfg.image.key, None)      # the raw column (paths, bytes) stays in the file
        if images is not None:
            sample["images"] = images        # whatever the column's name: what micro-batches read
        if cfg.teacher_response_key is not None:
            key = cfg.teacher_response_key
            if not isinstance(record.fields.get(key), str):
                raise DataError(f"{record.where}: teacher_response_key '{key}' must hold a string, "
                                f"got {type(record.fields.get(key)).__name__}")
            sample["teacher_response"] = record.fields[key]
        return sample
