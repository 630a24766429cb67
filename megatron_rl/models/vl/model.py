"""`VisionLanguageModel`: Megatron-Core `GPTModel` (M-RoPE) + the vision tower.

A subclass of GPTModel, so everything that reads a GPTModel (weight mapping names,
`decoder.layers`, `post_process`, `output_layer`, `final_hidden_states`, pipeline
`set_input_tensor`, dist-checkpointing) works unchanged; the tower is one more submodule,
`visual`, on the first pipeline stage only.

forward(input_ids, position_ids, attention_mask, images=None, **gpt_kwargs):
- `position_ids` [3, B, S] from `mrope_position_ids` (a [B, S] tensor is accepted for
  text-only batches: all three axes equal, as transformers does);
- `images` an `ImageBatch` (data/multimodal.py: pixel_values and image_grid_thw of the
  micro-batch's rows, in row order): the tower's features replace the embeddings at the
  image-pad positions, row-major over [B, S] like transformers' `masked_scatter`.
Output: GPTModel's (vocab-parallel logits, or hidden states on a non-last stage).
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_rl.models.vl.vision import image_features


class VisionLanguageModel(GPTModel):
    def __init__(self, *, vision: torch.nn.Module | None, image_token_id: int, **gpt_kwargs):
        super().__init__(**gpt_kwargs)
        self.visual = vision if self.pre_process else None
        self.image_token_id = int(image_token_id)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, images=None, **kwargs):
        if position_ids is not None and position_ids.dim() == 2:
            if images is not None:
                raise ValueError("VisionLanguageModel.forward: images need 3-D M-RoPE position_ids [3, B, S] "
                                 "(megatron_rl.models.vl.mrope_position_ids), got [B, S]")
            position_ids = position_ids[None].expand(3, -1, -1)
        if self.pre_process and decoder_input is None and images is not None:
            decoder_input = self.embed_with_images(input_ids, images)
        return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input, **kwargs)

    def embed_with_images(self, input_ids: torch.Tensor, images) -> torch.Tensor:
        """[S(/TP under sequence parallelism), B, H] embeddings with image features in place."""
        from megatron.core import parallel_state as mpu

        emb = self.embedding(input_ids=input_ids, position_ids=None)        # [s_local, b, h]
        feats = image_features(self.visual, images.pixel_values.to(emb.device),
                               images.image_grid_thw.to(emb.device)).to(emb.dtype)
        is_image = input_ids == self.image_token_id                           # [b, s]
        if int(is_image.sum()) != feats.shape[0]:
            raise ValueError(f"VisionLanguageModel: {int(is_image.sum())} image-pad tokens in input_ids but "
                             f"{feats.shape[0]} image features from image_grid_thw {images.image_grid_thw.tolist()}")
        order = is_image.flatten().cumsum(0).view_as(is_image) - 1            # feature index per position
        s_local = emb.shape[0]
        if s_local != input_ids.shape[1]:                                     # sequence parallel: this rank's slice
            start = mpu.get_tensor_model_parallel_rank() * s_local
            is_image, order = is_image[:, start:start + s_local], order[:, start:start + s_local]
        mask = is_image.t()[..., None]                                        # [s_local, b, 1]
        picked = feats[order.t().clamp(min=0)]                                # [s_local, b, h]
        return torch.where(mask, picked, emb)


def set_vision_trainable(chunks, trainable: bool) -> None:
    """`model.freeze_vision`: the tower's parameters get gradients or not."""
    for c in chunks:
        tower = getattr(c, "visual", None)
        if tower is not None:
            for p in tower.parameters():
                p.requires_grad_(trainable)


def vl_model_kwargs(arch, cfg, first_stage: bool):
    """(class, extra constructor kwargs) for provider._build_gpt: the tower only where the
    embedding is (the first pipeline stage), in the model's parameter dtype."""
    from megatron_rl.models.vl.config import hf_transformers_config
    from megatron_rl.models.vl.vision import build_vision_tower

    tower = build_vision_tower(arch, cfg.params_dtype) if first_stage else None
    return VisionLanguageModel, dict(vision=tower, image_token_id=hf_transformers_config(arch).image_token_id)
