"""Qwen2.5-VL HF -> Megatron -> HF (language model + vision tower) is bit-exact, through
`megatron-rl convert` at TP=2 and PP=2; the processor files travel with it."""
import pytest
import torch
from safetensors.torch import load_file

from tests.models.vl_fixtures import tiny_qwen2_5_vl


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_vl_round_trip_is_bit_exact(tmp_path, tp, pp):
    from megatron_rl.cli import main

    hf = tiny_qwen2_5_vl(tmp_path / "hf")
    assert main(["convert", "hf-to-mcore", "--hf-dir", hf, "--out", str(tmp_path / "mc"),
                 "--tp", str(tp), "--pp", str(pp)]) in (0, None)
    assert main(["convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "hf2")]) \
        in (0, None)
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b) and sum(k.startswith("visual.") for k in a) > 20
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (tmp_path / "hf2" / "preprocessor_config.json").exists()


def test_vl_global_names_cover_every_parameter(tmp_path):
    """The mapping's names (what iter_hf_weights streams, one tensor at a time) are exactly
    the model's parameters, with their shapes."""
    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.models.weight_mapping import global_param_names, global_shape
    from megatron_rl.parallel import init_distributed

    init_distributed()
    model = load_model_chunks(tiny_qwen2_5_vl(tmp_path / "hf"))[0]
    params = dict(model.named_parameters())
    names = global_param_names(model.arch)
    assert sorted(names) == sorted(params)
    assert all(tuple(params[n].shape) == global_shape(n, model.arch) for n in names)


def test_vl_checkpoint_under_module_names_loads_the_same(tmp_path):
    """transformers 4.52-4.5x saved `model.language_model.*` / `model.visual.*`: read as the hub names."""
    from safetensors.torch import save_file

    from megatron_rl.models.loading import load_model_chunks
    from megatron_rl.parallel import init_distributed

    hf = tiny_qwen2_5_vl(tmp_path / "hf")
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (moved / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    a = load_file(tmp_path / "hf" / "model.safetensors")
    renamed = {("model.visual." + k[7:] if k.startswith("visual.") else
                "model.language_model." + k[6:] if k.startswith("model.") else k): v for k, v in a.items()}
    save_file(renamed, str(moved / "model.safetensors"))
    init_distributed()
    x, y = load_model_chunks(hf)[0], load_model_chunks(moved)[0]
    for (n, p), (_, q) in zip(x.named_parameters(), y.named_parameters()):
        assert torch.equal(p, q), n
