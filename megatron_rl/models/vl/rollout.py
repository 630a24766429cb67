"""What the native engine feeds a model besides token ids: the prefill's position ids and
model inputs, and each decode step's position ids (`rollout_inputs`).

Text models: positions are the row index (Megatron's RoPE under the static KV cache reads
`max_sequence_length`, not these). Vision-language models: the prefill gets the rows'
`ImageBatch` (from each sample's `images` record) and 3-D M-RoPE position ids; generated
tokens are text, so a row's step n continues at max(prefill position) + 1 + n on all three
axes, which is transformers' `rope_deltas` rule. The static KV cache keeps keys before
RoPE and re-rotates all of them every step with the positions it is given (Megatron's
attention slices `k_pos_emb[:sequence_end]`), so each step passes the whole sequence's
positions `[3, B, prefill + steps]`, not only the new token's.
"""
from __future__ import annotations

import torch


class TextRolloutInputs:
    def __init__(self, b: int, length: int, device):
        self.b, self.length, self.device = b, length, device

    def prefill(self) -> tuple[torch.Tensor, dict]:
        return torch.arange(self.length, device=self.device).expand(self.b, self.length), {}

    def step(self, offset: int) -> torch.Tensor:
        return torch.full((self.b, 1), offset, device=self.device)


class VisionRolloutInputs:
    def __init__(self, arch, samples, ids: torch.Tensor, kv_mask: torch.Tensor):
        from megatron_rl.data.multimodal import ImageBatch
        from megatron_rl.models.vl.rope_index import mrope_position_ids

        self.images = ImageBatch.from_samples([s.get("images") for s in samples])
        grid = None if self.images is None else self.images.image_grid_thw
        self.positions = mrope_position_ids(ids, kv_mask, grid, arch).to(ids.device)     # [3, b, L]
        self.next = self.positions.amax(dim=(0, 2)) + 1                                  # [b]

    def prefill(self) -> tuple[torch.Tensor, dict]:
        device = self.positions.device
        return self.positions, ({} if self.images is None else {"images": self.images.to(device)})

    def step(self, offset: int) -> torch.Tensor:
        new = self.next[None, :, None].expand(3, -1, 1)
        self.positions = torch.cat([self.positions, new], dim=2)
        self.next = self.next + 1
        return self.positions


def rollout_inputs(model, samples, ids: torch.Tensor, kv_mask: torch.Tensor):
    """`ids` / `kv_mask` [B, L]: the prefill (prompt ++ tokens generated so far) and its
    key mask; `samples` the rows' records. `model` the bare first chunk."""
    arch = getattr(model, "arch", None)
    if arch is not None and arch.is_vl:
        return VisionRolloutInputs(arch, samples, ids, kv_mask)
    b, length = ids.shape
    return TextRolloutInputs(b, length, ids.device)
