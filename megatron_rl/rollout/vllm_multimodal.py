"""Image prompts on vLLM (Qwen2-VL / Qwen2.5-VL), without importing vLLM.

Request format (vLLM 0.26 `TokensPrompt`): `{"prompt_token_ids": ids, "multi_modal_data":
{"image": [PIL images]}}`. For a token prompt vLLM runs the HF processor on the images only
and then applies the model's prompt update itself (`BaseMultiModalProcessor.
_apply_hf_processor_main` returns `is_update_applied=False` for token prompts; Qwen2-VL's
update replaces each `<|image_pad|>` with that image's t*h*w / merge^2 pads). So vLLM wants
ONE pad per image, while our data path (data/multimodal.py) expands the pads by the grid:
each image's run of pads is collapsed to one here, and vLLM's expanded prompt
(`RequestOutput.prompt_token_ids`) must equal ours again, else its processor resized the
image to another grid (`data.image.min_pixels` / `max_pixels` are handed to vLLM as
`mm_processor_kwargs`, so they agree). The sample's `ImageInputs` stay on the output rows
(the output batch copies the prompt rows' records).

Weight sync: the actor's HF names (`model.*`, `lm_head.*`, `visual.*`, the hub checkpoint's)
are what vLLM's `Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper` maps
(`model.` -> `language_model.model.`, `lm_head.` -> `language_model.lm_head.`, `visual.`
kept). A frozen tower (`model.freeze_vision: true`) never changes, so its tensors are
skipped; a trained one is streamed with the language model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

VISION_PREFIX = "visual."
VL_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")


def collapse_image_pads(ids: Sequence[int], pad_id: int, num_images: int, where: str) -> list[int]:
    """Each run of image-pad ids -> one pad (vLLM expands it again); the runs must be one per image."""
    out: list[int] = []
    runs = 0
    for t in ids:
        if t == pad_id and out and out[-1] == pad_id:
            continue
        runs += t == pad_id
        out.append(int(t))
    if runs != num_images:
        raise ValueError(f"{where}: the prompt has {runs} runs of <|image_pad|> tokens for {num_images} images")
    return out


def attach_images(batch, requests: list[dict], pad_id_of) -> list[int]:
    """Give each row with images its `multi_modal_data` and a one-pad-per-image prompt (in
    place); returns those rows. `pad_id_of()` is called once, only if a row has images."""
    rows, pad_id = [], None
    for i, (sample, req) in enumerate(zip(batch.samples, requests)):
        images = sample.get("images")
        if images is None or not images.num_images:
            continue
        raw = list(getattr(images, "raw", ()) or ())
        if len(raw) != images.num_images:
            raise ValueError(f"rollout.engine=vllm: sample {sample.get('uid', i)!r} has {images.num_images} "
                             f"processed images but {len(raw)} raw ones (ImageInputs.raw); vLLM runs its own "
                             "processor on the raw images, which the dataset keeps (data/multimodal.py)")
        if pad_id is None:
            pad_id = pad_id_of()
        req["prompt_token_ids"] = collapse_image_pads(req["prompt_token_ids"], pad_id, images.num_images,
                                                      f"sample {sample.get('uid', i)!r}")
        req["multi_modal_data"] = {"image": raw}
        rows.append(i)
    return rows


def check_expanded_prompts(prompts: list[list[int]], outputs: Sequence, rows: Iterable[int]) -> None:
    """vLLM's expanded prompt of each image row must be ours (same image grids)."""
    for i in rows:
        got = getattr(outputs[i], "prompt_token_ids", None)
        if got is not None and list(got) != prompts[i]:
            raise RuntimeError(f"vLLM expanded prompt row {i} to {len(got)} tokens, the dataset to "
                               f"{len(prompts[i])}: vLLM's image processor resized an image to another grid "
                               "than ours; set data.image.min_pixels / data.image.max_pixels (handed to vLLM "
                               "as mm_processor_kwargs) or rollout.vllm.extra_args.mm_processor_kwargs alike")


def is_vl_checkpoint(path) -> bool:
    """Whether `path`'s config.json names a Qwen2-VL / Qwen2.5-VL architecture."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    return bool(set(json.loads(cfg.read_text()).get("architectures") or ()) & set(VL_ARCHITECTURES))


def vl_engine_kwargs(cfg, tokenizer_path: str) -> dict:
    """`vllm.LLM` keyword arguments for a vision-language checkpoint ({} for a text one):
    images per prompt up to `data.image.max_images`, no video, and the processor's pixel
    bounds when `data.image.min_pixels` / `max_pixels` are set."""
    if not is_vl_checkpoint(cfg.model.path):
        return {}
    image = getattr(cfg.data, "image", None)
    kw: dict = {"limit_mm_per_prompt": {"image": int(getattr(image, "max_images", 8)), "video": 0}}
    if image is not None and (image.min_pixels is not None or image.max_pixels is not None):
        from megatron_rl.data.multimodal import image_size_kwargs, load_image_processor

        proc = load_image_processor(image.processor_path or tokenizer_path)
        kw["mm_processor_kwargs"] = {"size": image_size_kwargs(proc, image)}
    return kw


def vision_skip_prefixes(cfg) -> tuple[str, ...]:
    """Weight-sync name prefixes to leave out: the tower's when it is frozen."""
    if is_vl_checkpoint(cfg.model.path) and getattr(cfg.model, "freeze_vision", True):
        return (VISION_PREFIX,)
    return ()


def without_prefixes(named: Iterable[tuple[str, torch.Tensor]], prefixes: tuple[str, ...]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream minus tensors under `prefixes` (every rank still iterates the whole stream,
    so the PP broadcasts inside `iter_hf_weights` stay matched)."""
    for name, t in named:
        if not (prefixes and name.startswith(prefixes)):
            yield name, t
