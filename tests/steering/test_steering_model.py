"""Steering hooks on a tiny Megatron GPTModel: identities, direction, per-sample rows, scope."""
import pytest
import torch

from megatron_rl.steering import SteeringConfig, SteeringController, build_intervention, build_steering
from megatron_rl.steering import capture_layer_output, load_sae
from tests.steering.conftest import logits_of, make_sae

FIX = __import__("pathlib").Path(__file__).parent / "fixtures"


def controller(model, mode="add", layer=1, feats=(3,), scope="all", sae=None, **kw):
    sae = sae or make_sae(layer=layer)
    ctl = SteeringController(build_intervention(mode, sae, feature_idxs=list(feats), **kw), layer, scope)
    assert ctl.attach(model)
    return ctl


def test_strength_zero_leaves_logits_bit_identical(tiny_model, ids):
    base = logits_of(tiny_model, ids)
    ctl = controller(tiny_model, feats=(3, 5), max_activations=[4.0, 2.0])
    ctl.set_strengths(torch.zeros(3, 2))
    try:
        assert torch.equal(logits_of(tiny_model, ids), base)
        ctl.set_strengths(torch.ones(3, 2))
        assert (logits_of(tiny_model, ids) - base).abs().max() > 1e-3     # the hook really runs
    finally:
        ctl.detach()


def test_clamp_to_current_activation_leaves_logits_equal(tiny_model):
    sae = make_sae(layer=2)
    one_tok = torch.arange(4).view(4, 1) * 7                                # [B=4, S=1]
    with capture_layer_output(tiny_model, 2) as cap:
        base = logits_of(tiny_model, one_tok)
    acts = sae.encode(cap["hidden"])[0]                                      # [B, d_sae]
    feat = int(acts.gt(0).sum(0).argmax())                                   # active in most rows
    assert acts[:, feat].gt(0).any()
    ctl = controller(tiny_model, "clamp", layer=2, feats=(feat,), sae=sae, max_activations=[2.0])
    ctl.set_strengths(acts[:, feat:feat + 1] / 2.0)
    try:
        assert (logits_of(tiny_model, one_tok) - base).abs().max().item() < 1e-5
        ctl.set_strengths(acts[:, feat:feat + 1] / 2.0 + 3.0)
        assert (logits_of(tiny_model, one_tok) - base).abs().max().item() > 1e-3
    finally:
        ctl.detach()


def test_unembedding_feature_raises_token_probability_monotonically(tiny_model, ids):
    tok = 42
    u = tiny_model.embedding.word_embeddings.weight[tok].detach().clone()   # tied: row = unembedding
    sae = make_sae(layer=3, rows={0: u / u.norm()})
    ctl = controller(tiny_model, layer=3, feats=(0,), sae=sae)
    probs = []
    try:
        for s in [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]:
            ctl.set_strengths(torch.full((3, 1), s))
            logits = logits_of(tiny_model, ids)
            probs.append(logits.softmax(-1)[..., tok])                          # [B, S]
    finally:
        ctl.detach()
    p = torch.stack(probs)
    assert bool((p[1:] > p[:-1]).all()), p[:, 0, :]
    assert bool((logits.argmax(-1) == tok).all())     # tiny random embeddings: logits are small, p saturates
    assert bool((p[-1] > 3 * p[0]).all())


def test_per_sample_strengths_only_change_their_rows(tiny_model, ids):
    base = logits_of(tiny_model, ids)
    ctl = controller(tiny_model, feats=(3,))
    ctl.set_strengths(torch.tensor([[0.0], [5.0], [0.0]]))
    try:
        out = logits_of(tiny_model, ids)
    finally:
        ctl.detach()
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert (out[1] - base[1]).abs().min(-1).values.gt(0).all()               # every position of row 1 moved


@pytest.mark.parametrize("scope", ["prompt", "generated"])
def test_scope_edits_only_its_positions(tiny_model, ids, scope):
    is_gen = torch.zeros(3, 8, dtype=torch.bool)
    is_gen[:, 5:] = True
    is_gen[1, 3:] = True                                                     # rows may differ
    with capture_layer_output(tiny_model, 1) as cap:
        logits_of(tiny_model, ids)
    base_h = cap["hidden"]
    ctl = controller(tiny_model, feats=(3,), scope=scope)
    ctl.set_strengths(torch.full((3, 1), 3.0))
    ctl.set_positions(is_gen)
    try:
        with capture_layer_output(tiny_model, 1) as cap:                     # registered after: sees the edit
            logits_of(tiny_model, ids)
    finally:
        ctl.detach()
    changed = (cap["hidden"] - base_h).abs().amax(-1).gt(0).t()              # [B, S]
    assert torch.equal(changed, is_gen if scope == "generated" else ~is_gen)


def test_decode_step_positions(tiny_model, ids):
    """Engine contract: a decode step passes [B, 1] all True; scope=prompt then leaves it alone."""
    step = ids[:, :1]
    base = logits_of(tiny_model, step)
    for scope, same in (("prompt", True), ("generated", False)):
        ctl = controller(tiny_model, feats=(3,), scope=scope)
        ctl.set_strengths(torch.full((3, 1), 3.0))
        ctl.set_positions(torch.ones(3, 1, dtype=torch.bool))
        try:
            assert torch.equal(logits_of(tiny_model, step), base) == same
        finally:
            ctl.detach()


def test_disabled_removes_the_hook(tiny_model, ids):
    base = logits_of(tiny_model, ids)
    ctl = controller(tiny_model, feats=(3,))
    layer = ctl._module
    try:
        with ctl.disabled():
            assert len(layer._forward_hooks) == 0 and not ctl.active
            assert torch.equal(logits_of(tiny_model, ids), base)
        assert len(layer._forward_hooks) == 1 and ctl.active
        assert not torch.equal(logits_of(tiny_model, ids), base)
    finally:
        ctl.detach()
    assert len(layer._forward_hooks) == 0


def test_global_mode_scales_the_configured_mix(tiny_model, ids):
    sae = make_sae()
    add = controller(tiny_model, "add", feats=(3, 4), sae=sae, strengths=[1.0, -2.0])
    ref = logits_of(tiny_model, ids)
    add.detach()
    glob = controller(tiny_model, "global", feats=(3, 4), sae=sae, strengths=[1.0, -2.0])
    try:
        assert (logits_of(tiny_model, ids) - ref).abs().max() < 1e-5          # default g = 1
        glob.set_strengths(torch.zeros(3, 1))
        assert torch.equal(logits_of(tiny_model, ids), logits_of_plain(tiny_model, ids, glob))
    finally:
        glob.detach()


def logits_of_plain(model, ids, ctl):
    with ctl.disabled():
        return logits_of(model, ids)


def test_build_steering_off_is_none_and_registers_nothing(tiny_model):
    assert build_steering(SteeringConfig(enable=False, sae_path="/nonexistent"), tiny_model) is None
    assert all(len(layer._forward_hooks) == 0 for layer in tiny_model.decoder.layers)


def test_build_steering_d_in_mismatch_names_both(tiny_model):
    cfg = SteeringConfig(enable=True, sae_path=str(FIX / "standard"), feature_idxs=[1])
    with pytest.raises(ValueError, match=r"d_in=16.*hidden size is 64"):
        build_steering(cfg, tiny_model)


def test_build_steering_from_disk_uses_hook_layer(tiny_model, tmp_path):
    from megatron_rl.steering import save_sae
    save_sae(make_sae(layer=2), tmp_path / "sae")
    ctl = build_steering(SteeringConfig(enable=True, sae_path=str(tmp_path / "sae"), feature_idxs=[1, 2],
                                        mode="clamp"), tiny_model)
    try:
        assert ctl.layer == 2 and ctl._module is tiny_model.decoder.layers[2] and ctl.active
    finally:
        ctl.detach()


def test_scope_without_positions_is_an_error(tiny_model, ids):
    ctl = controller(tiny_model, feats=(3,), scope="generated")
    try:
        with pytest.raises(RuntimeError, match="set_positions"):
            logits_of(tiny_model, ids)
    finally:
        ctl.detach()


def test_strength_rows_must_match_batch(tiny_model, ids):
    ctl = controller(tiny_model, feats=(3,))
    ctl.set_strengths(torch.ones(2, 1))
    try:
        with pytest.raises(ValueError, match="2 rows but the forward batch has 3"):
            logits_of(tiny_model, ids)
    finally:
        ctl.detach()


def test_recompute_forward_with_use_matches_split_rollout_forwards(tiny_model, ids):
    """Trainer recompute (one prompt++response forward under `use`) sees the same steered logits
    at response positions as the rollout's prefill (prompt, all False) followed by its response."""
    from megatron_rl.steering import generated_positions

    ctl = controller(tiny_model, feats=(3,), scope="generated")
    s = torch.tensor([[2.0], [0.0], [-1.0]])
    try:
        with ctl.use(s, generated_positions(5, 3, 3)):
            full = logits_of(tiny_model, ids)
        assert ctl._strengths is None and ctl._is_generated is None          # restored
        ctl.set_positions(torch.zeros(3, 5, dtype=torch.bool))
        ctl.set_strengths(s)
        prompt_only = logits_of(tiny_model, ids[:, :5])
    finally:
        ctl.detach()
    assert (full[:, :5] - prompt_only).abs().max() < 1e-5
    assert torch.equal(full[1], logits_of(tiny_model, ids)[1])               # strength 0 row
