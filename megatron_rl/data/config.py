"""The `data:` config section (prompts, templating, truncation, batching)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImageConfig:
    """`data.image`: image inputs of vision-language prompts (data/multimodal.py).

    A record's `key` column holds its images (paths relative to the data file, or bytes);
    each `<image>` in the prompt marks where one goes. The model's own processor
    (`AutoProcessor` of `processor_path`, null = the tokenizer's directory) resizes each
    image to between `min_pixels` and `max_pixels` (null = the processor's own bounds),
    which fixes its token count: pixels / (patch * merge)^2."""
    key: str = "images"
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_images: int = 8                     # per prompt; more is an error naming the row
    processor_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"data.image.{name} must be positive or null, got {value}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"data.image.min_pixels={self.min_pixels} exceeds data.image.max_pixels="
                             f"{self.max_pixels}")
        if self.max_images <= 0:
            raise ValueError(f"data.image.max_images must be positive, got {self.max_images}")


@dataclass
class DataConfig:
    # Files: JSONL (`.jsonl`/`.json`, one object per line) or Parquet (`.parquet`).
    # Several files are concatenated in the order given.
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)

    # Prompt: `prompt_key` holds chat messages [{"role", "content"}] or plain text
    # (wrapped as one user message). The tokenizer's own chat template renders it with
    # the generation prompt; `use_chat_template: false` tokenizes the raw text instead.
    prompt_key: str = "prompt"
    use_chat_template: bool = True
    system_prompt: str | None = None        # prepended when the messages have no system turn
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}

    # Length policy: prompts longer than `max_prompt_length` tokens are an error
    # (`truncation: error`, naming file and line), or keep their last (`left`) or first
    # (`right`) tokens; `filter_overlong_prompts` drops them when the dataset loads.
    max_prompt_length: int = 512
    truncation: str = "error"               # error | left | right
    filter_overlong_prompts: bool = False

    # Extra per-sample fields: every other field is kept as is in the sample dict;
    # `teacher_response_key` (if set) must be present and is copied to
    # sample["teacher_response"] (adversarial distillation, SFT mixing).
    teacher_response_key: str | None = None

    # Images (vision-language models): see ImageConfig.
    image: ImageConfig = field(default_factory=ImageConfig)

    # Batching: prompts per step, GLOBAL over DP ranks (before `n` samples per prompt); validation batches
    # in file order, `val_batch_size: null` = the whole validation set at once.
    train_batch_size: int = 32
    val_batch_size: int | None = None
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = True                  # a short last batch of an epoch is skipped

    def __post_init__(self) -> None:
        if self.truncation not in ("error", "left", "right"):
            raise ValueError(f"data.truncation must be one of error|left|right, got '{self.truncation}'")
        if self.max_prompt_length <= 0:
            raise ValueError(f"data.max_prompt_length must be positive, got {self.max_prompt_length}")
        if self.train_batch_size <= 0:
            raise ValueError(f"data.train_batch_size must be positive, got {self.train_batch_size}")
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.val_files, str):
            self.val_files = [self.val_files]
