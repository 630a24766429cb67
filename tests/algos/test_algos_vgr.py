"""VGR token weights on hand-made attention rows."""
import math

import pytest
import torch

from megatron_rl.algos import gaussian_smooth, vgr_token_weights
from megatron_rl.algos.vgr import clip_token_weights

# prompt columns: 0 = BOS, 1 = instruction, 2-3 = context; two response tokens.
ROWS = torch.tensor([[0.5, 0.1, 0.2, 0.2],     # -> ins .2, ctx .8 after BOS removal: VGR 0.5, w 2
                     [0.6, 0.3, 0.05, 0.05]])  # -> ins .75, ctx .25: VGR 6, w 1/6
INS = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
CTX = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
RESP = torch.ones(1, 2)
EXPECTED = [24 / 13, 2 / 13]  # w / mean(w), mean = 13/12


def _attn(rows):
    return rows.view(1, 1, *rows.shape)


def test_vgr_hand_computed_without_clipping():
    w = vgr_token_weights([_attn(ROWS)], CTX, INS, RESP, clip=None)
    assert w.tolist()[0] == pytest.approx(EXPECTED, rel=1e-4)


def test_vgr_clips_after_normalising():
    w = vgr_token_weights([_attn(ROWS)], CTX, INS, RESP, clip=(0.2, 3.0))
    assert w.tolist()[0] == pytest.approx([24 / 13, 0.2], rel=1e-4)


def test_heads_are_averaged():
    heads = torch.stack([ROWS * 0.5, ROWS * 1.5]).unsqueeze(0)  # mean = ROWS
    heads[0, 0, 0] = torch.tensor([0.5, 0.0, 0.25, 0.25])
    heads[0, 1, 0] = torch.tensor([0.5, 0.2, 0.15, 0.15])
    w = vgr_token_weights([heads], CTX, INS, RESP, clip=None)
    assert w.tolist()[0] == pytest.approx(EXPECTED, rel=1e-4)


def test_only_last_k_layers_are_used():
    noise = _attn(torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    w = vgr_token_weights([noise, _attn(ROWS)], CTX, INS, RESP, last_k=1, clip=None)
    assert w.tolist()[0] == pytest.approx(EXPECTED, rel=1e-4)


def test_bos_is_first_real_column_of_left_padded_prompt():
    padded = torch.cat([torch.zeros(2, 1), ROWS], dim=1)  # pad column receives no attention
    ctx, ins = torch.cat([torch.zeros(1, 1), CTX], 1), torch.cat([torch.zeros(1, 1), INS], 1)
    w = vgr_token_weights([_attn(padded)], ctx, ins, RESP, clip=None)
    assert w.tolist()[0] == pytest.approx(EXPECTED, rel=1e-4)
    w2 = vgr_token_weights([_attn(padded)], ctx, ins, RESP, clip=None,
                           prompt_mask=torch.tensor([[0, 1, 1, 1, 1]]))
    assert w2.tolist()[0] == pytest.approx(EXPECTED, rel=1e-4)


def test_invalid_response_tokens_get_zero_and_do_not_enter_the_mean():
    rows = torch.cat([ROWS, torch.tensor([[0.0, 1.0, 0.0, 0.0]])])
    w = vgr_token_weights([_attn(rows)], CTX, INS, torch.tensor([[1.0, 1.0, 0.0]]), clip=None)
    assert w.tolist()[0] == pytest.approx(EXPECTED + [0.0], rel=1e-4)


def test_no_instruction_tokens_gives_uniform_weights():
    w = vgr_token_weights([_attn(ROWS)], CTX, torch.zeros(1, 4), RESP)
    assert w.tolist()[0] == pytest.approx([1.0, 1.0])


def test_no_context_tokens_gives_weights_one_on_valid_tokens_only():
    w = vgr_token_weights([_attn(ROWS)], torch.zeros(1, 4), INS, torch.tensor([[1.0, 0.0]]), clip=(0.2, 0.5))
    assert w.tolist()[0] == [0.5, 0.0]      # 1, clipped like any weight; 0 off the mask


def test_clip_token_weights_clamps_and_zeroes_off_the_mask():
    w = torch.tensor([[0.1, 1.0, 5.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert clip_token_weights(w, mask, (0.2, 3.0)).tolist()[0] == pytest.approx([0.2, 1.0, 3.0, 0.0])
    assert clip_token_weights(w, mask, None) is w


def test_smoothing_kernel_half_width_and_replicate_padding():
    impulse = torch.zeros(1, 9, dtype=torch.float64)
    impulse[0, 4] = 1.0
    x = torch.arange(-3, 4, dtype=torch.float64)  # sigma 1 -> half-width 3
    kernel = torch.exp(-0.5 * x ** 2) / torch.exp(-0.5 * x ** 2).sum()
    torch.testing.assert_close(gaussian_smooth(impulse, 1.0)[0, 1:8], kernel)
    torch.testing.assert_close(gaussian_smooth(torch.full((1, 5), 2.0), 0.2), torch.full((1, 5), 2.0))


def test_smoothing_in_vgr_keeps_mean_one():
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 3, 6, 5, generator=g), -1)
    ctx = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    ins = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    resp = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    w = vgr_token_weights([attn], ctx, ins, resp, smooth_sigma=1.0, clip=None)
    means = (w * resp).sum(-1) / resp.sum(-1)
    torch.testing.assert_close(means, torch.ones(2))
    assert w.dtype == torch.float32 and (w[1, 4:] == 0).all()


def test_shape_errors_name_the_tensor():
    with pytest.raises(ValueError, match="'context_mask'"):
        vgr_token_weights([_attn(ROWS)], CTX[:, :3], INS, RESP)
    with pytest.raises(ValueError, match="attentions"):
        vgr_token_weights([], CTX, INS, RESP)
