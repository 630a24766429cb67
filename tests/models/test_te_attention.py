"""TE core attention must see a mask type under which it reads our padding mask (issue #19:
bf16 TE backends ignore `attention_mask` for `causal`, so left padding was attended)."""
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_rl.models.te_attention import mask_type_for_call


def test_given_mask_switches_causal_and_no_mask_to_arbitrary():
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    assert mask_type_for_call(mask, AttnMaskType.causal) == AttnMaskType.arbitrary
    assert mask_type_for_call(mask, AttnMaskType.no_mask) == AttnMaskType.arbitrary
    assert mask_type_for_call(mask, AttnMaskType.padding_causal) == AttnMaskType.padding_causal


def test_no_mask_keeps_the_spec_type():
    assert mask_type_for_call(None, AttnMaskType.causal) == AttnMaskType.causal
    assert mask_type_for_call(None, AttnMaskType.no_mask) == AttnMaskType.no_mask
