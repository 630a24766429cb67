"""Images of vision-language prompts (Qwen2-VL / Qwen2.5-VL), from the record to the model.

verl/EasyR1's schema: a record's `images` column (`data.image.key`) holds a list of
images (paths, relative to the data file or absolute; raw bytes; or `{"bytes", "path"}`
dicts as HF datasets write them to Parquet), and each `<image>` in the prompt text marks
where one goes, in order. The dataset (data/dataset.py) turns them into what the
Qwen2-VL chat template and processor produce:

  `<image>` -> `<|vision_start|><|image_pad|><|vision_end|>`   (rendered by the template)
  each `<|image_pad|>` id -> n copies, n = t*h*w / merge_size^2 of that image's grid

so the prompt ids carry one image-pad token per merged patch (the model puts the vision
tower's features there), and the sample record carries the processor's output as an
`ImageInputs` (`sample["images"]`), kept through rollout, log-probs and the update
(`Batch.select` copies the records). Micro-batches join their rows' images into one
`ImageBatch` in row order (trainer/microbatch.py). The token ids come from the tokenizer,
never from matching strings.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_rl.data.readers import DataError, Record

PLACEHOLDER = "<image>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


@dataclass
class ImageInputs:
    """One sample's images as the processor returns them."""
    pixel_values: torch.Tensor     # [num_patches, C * temporal_patch * patch * patch] float
    image_grid_thw: torch.Tensor   # [num_images, 3] long
    raw: tuple = field(default=(), repr=False, compare=False)   # the PIL images (vLLM runs its own processor)

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    def to(self, device) -> "ImageInputs":
        return ImageInputs(self.pixel_values.to(device), self.image_grid_thw.to(device), self.raw)


@dataclass
class ImageBatch:
    """The images of a micro-batch: every row's patches and grids concatenated in row order
    (rows without images add nothing), which is the order the model meets image pads in."""
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    @classmethod
    def from_samples(cls, images: Sequence[ImageInputs | None]) -> "ImageBatch | None":
        """None when no row has images (a text-only micro-batch)."""
        present = [x for x in images if x is not None and x.num_images]
        if not present:
            return None
        return cls(torch.cat([x.pixel_values for x in present]), torch.cat([x.image_grid_thw for x in present]))

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    def to(self, device) -> "ImageBatch":
        return ImageBatch(self.pixel_values.to(device), self.image_grid_thw.to(device))


def image_token_counts(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """Image-pad tokens per image: its patches after the merger (t * h * w / merge^2)."""
    return [int(n) // (merge_size ** 2) for n in image_grid_thw.prod(-1).tolist()]


@dataclass(frozen=True)
class VisionTokens:
    """The ids of the vision special tokens in the tokenizer (the span VGR reads)."""
    start: int
    pad: int
    end: int

    @classmethod
    def of(cls, tokenizer) -> "VisionTokens":
        ids = []
        for token in (VISION_START, IMAGE_PAD, VISION_END):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id or list(tokenizer.encode(
                    token, add_special_tokens=False)) != [tid]:
                raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no special token "
                                 f"{token!r}: image prompts need a vision-language tokenizer (Qwen2-VL / "
                                 f"Qwen2.5-VL) where {VISION_START}, {IMAGE_PAD} and {VISION_END} are tokens")
            ids.append(int(tid))
        return cls(*ids)


def record_images(record: Record, key: str, max_images: int) -> list[Any]:
    """The record's images as PIL images (empty when the column is absent or empty)."""
    value = record.fields.get(key)
    if value is None or value == [] or value == "":
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) > max_images:
        raise DataError(f"{record.where}: column '{key}' holds {len(items)} images, more than "
                        f"data.image.max_images={max_images}")
    base = Path(record.path).parent
    return [_load_image(item, base, f"{record.where}: {key}[{i}]") for i, item in enumerate(items)]


def _load_image(item: Any, base: Path, where: str):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, dict):
        if item.get("bytes"):
            item = item["bytes"]
        elif item.get("path"):
            item = item["path"]
        else:
            raise DataError(f"{where}: an image dict needs 'bytes' or 'path', got keys {sorted(item)}")
    if isinstance(item, (bytes, bytearray)):
        try:
            return Image.open(io.BytesIO(item)).convert("RGB")
        except Exception as e:   # PIL raises several types for undecodable bytes
            raise DataError(f"{where}: {len(item)} bytes are not a readable image ({e})") from None
    if isinstance(item, str):
        path = Path(item) if Path(item).is_absolute() else base / item
        if not path.is_file():
            raise DataError(f"{where}: image file not found: {path}")
        try:
            return Image.open(path).convert("RGB")
        except Exception as e:
            raise DataError(f"{where}: {path} is not a readable image ({e})") from None
    raise DataError(f"{where}: an image must be a path, bytes or a {{'bytes', 'path'}} dict, "
                    f"got {type(item).__name__}")


def place_images(messages: list[dict[str, str]], num_images: int, where: str) -> list[dict[str, str]]:
    """Messages with each `<image>` replaced by the Qwen2-VL template's image span (one pad,
    expanded after tokenization); the placeholder count must equal the image count."""
    found = sum(m["content"].count(PLACEHOLDER) for m in messages)
    if found != num_images:
        raise DataError(f"{where}: the prompt has {found} '{PLACEHOLDER}' placeholders for {num_images} images; "
                        f"write one '{PLACEHOLDER}' per image where it goes in the prompt")
    span = VISION_START + IMAGE_PAD + VISION_END
    return [{**m, "content": m["content"].replace(PLACEHOLDER, span)} for m in messages]


def expand_image_pads(ids: list[int], counts: list[int], pad_id: int, where: str) -> list[int]:
    """Each image-pad id repeated to its image's token count, in order."""
    pads = sum(1 for t in ids if t == pad_id)
    if pads != len(counts):
        raise DataError(f"{where}: the tokenized prompt has {pads} {IMAGE_PAD} tokens for {len(counts)} images "
                        f"(does the prompt text itself contain '{IMAGE_PAD}'?)")
    out: list[int] = []
    left = iter(counts)
    for t in ids:
        out.extend([t] * next(left) if t == pad_id else [t])
    return out


def load_image_processor(path: str):
    """The image processor of the model's own `AutoProcessor` (Qwen2-VL's resizes to the
    patch grid and returns `pixel_values`, `image_grid_thw`). Where the full processor
    cannot be built (Qwen2-VL's also builds a video processor, which needs torchvision)
    the same `preprocessor_config.json` is read by `AutoImageProcessor`."""
    import transformers

    try:
        proc = transformers.AutoProcessor.from_pretrained(path)
        ip = getattr(proc, "image_processor", proc)
    except Exception as first:   # transformers raises ImportError/OSError/ValueError here
        try:
            ip = transformers.AutoImageProcessor.from_pretrained(path)
        except Exception as e:
            raise ValueError(f"data.image: cannot load the model's processor from {path} ({first}; {e}); "
                             f"set data.image.processor_path to a directory with preprocessor_config.json"
                             ) from None
    if not hasattr(ip, "merge_size"):
        raise ValueError(f"data.image: the processor of {path} ({type(ip).__name__}) is not a Qwen2-VL-style "
                         f"image processor (no merge_size)")
    return ip


class ImageEncoder:
    """Record images -> (prompt messages with image spans, ImageInputs, expanded prompt ids)."""

    def __init__(self, cfg, tokenizer, processor=None):
        self.cfg = cfg
        self.tokens = VisionTokens.of(tokenizer)
        self.processor = processor if processor is not None else load_image_processor(
            cfg.processor_path or tokenizer.name_or_path)
        self.merge_size = int(self.processor.merge_size)

    def images_of(self, record: Record) -> list[Any]:
        return record_images(record, self.cfg.key, self.cfg.max_images)

    def process(self, images: list[Any]) -> ImageInputs:
        out = self.processor(images=images, size=image_size_kwargs(self.processor, self.cfg), return_tensors="pt")
        return ImageInputs(out["pixel_values"].float(), out["image_grid_thw"].long(), tuple(images))

    def expand(self, ids: list[int], inputs: ImageInputs, where: str) -> list[int]:
        return expand_image_pads(ids, image_token_counts(inputs.image_grid_thw, self.merge_size),
                                 self.tokens.pad, where)


def image_size_kwargs(processor, cfg) -> dict[str, int]:
    """The processor's `size` (pixel bounds) with `data.image.min_pixels` / `max_pixels` applied;
    the vLLM engine hands the same bounds to vLLM's processor (rollout/vllm_multimodal.py)."""
    size = dict(processor.size)
    if cfg.min_pixels is not None:
        size["shortest_edge"] = cfg.min_pixels
    if cfg.max_pixels is not None:
        size["longest_edge"] = cfg.max_pixels
    return {k: size[k] for k in ("shortest_edge", "longest_edge")}


def vision_token_ids(tokenizer) -> list[int]:
    """Ids a response must not hold: the vision span's tokens and, if the tokenizer has it,
    `<|video_pad|>` (the model counts image/video pads over the whole sequence)."""
    t = VisionTokens.of(tokenizer)
    ids = [t.start, t.pad, t.end]
    video = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    if video is not None and video != tokenizer.unk_token_id:
        ids.append(int(video))
    return ids


def cut_at_vision_tokens(batch, token_ids: Sequence[int], pad_id: int) -> int:
    """End each response before the first vision special token it sampled (that token and
    the rest become padding, out of the loss); returns how many responses were cut.

    Why: the vision-language forward places image features at every image pad of the
    sequence and M-RoPE gives them grid positions, so a sampled pad in a response would
    not match the prompt's images (transformers fails the same way). A trained model
    hardly ever samples one; a random one does."""
    ids = batch["response_ids"]
    live = batch["response_mask"] > 0
    if "response_attention_mask" in batch:
        live = live | (batch["response_attention_mask"] > 0)
    bad = torch.isin(ids, torch.as_tensor(list(token_ids), dtype=ids.dtype)) & live
    rows = bad.any(-1)
    if not bool(rows.any()):
        return 0
    cols = torch.arange(ids.shape[1])
    first = torch.where(rows, bad.float().argmax(-1), torch.full_like(rows, ids.shape[1], dtype=torch.long))
    keep = cols[None] < first[:, None]
    batch["response_ids"] = ids.masked_fill(~keep, pad_id)
    for name in ("response_mask", "response_attention_mask", "rollout_logprob"):
        if name in batch:
            batch[name] = batch[name] * keep.to(batch[name].dtype)
    return int(rows.sum())
