"""Regenerate the sae-lens parity fixtures under tests/steering/fixtures/.

Needs sae-lens, which is not a test dependency: run it from a separate venv, e.g.
    python3.11 -m venv .venv-sae && .venv-sae/bin/pip install torch==2.13.0 sae-lens
    .venv-sae/bin/python tests/steering/make_fixtures.py
Each fixture directory holds a random tiny SAE written by sae-lens' own `save_model`
(d_in 16, d_sae 32) plus `expected.safetensors`: inputs `x`, sae-lens' `encode(x)`,
`decode(encode(x))` and, for SAEs without run-time normalisation, `decode(f_rand)`.
The pre-6.0 fixture hand-writes an old-style cfg.json and takes the expectations from
sae-lens' `load_from_disk`, so it also pins sae-lens' config migration.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from sae_lens import SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE
from sae_lens import StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

OUT = Path(__file__).parent / "fixtures"
D_IN, D_SAE = 16, 32


def _randomise(sae, gen):
    """Non-trivial values everywhere (sae-lens inits biases to zero)."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.3)
            elif name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 1 else 0.5))


def _expected(sae, gen, with_decode_rand: bool):
    x = torch.randn(3, 5, D_IN, generator=gen) * 2.0 + 0.5
    with torch.no_grad():
        f = sae.encode(x)
        recon = sae.decode(f)
        out = {"x": x, "encode": f.contiguous(), "recon": recon.contiguous()}
        if with_decode_rand:
            f_rand = torch.rand(3, 5, D_SAE, generator=gen) * (torch.rand(3, 5, D_SAE, generator=gen) < 0.2)
            out.update(f_rand=f_rand, decode_rand=sae.decode(f_rand).contiguous())
    return out


CASES = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "standard_nob": (StandardSAE, StandardSAEConfig, {"apply_b_dec_to_input": False}),
    "standard_cnr": (StandardSAE, StandardSAEConfig, {"normalize_activations": "constant_norm_rescale"}),
    "standard_ln": (StandardSAE, StandardSAEConfig, {"normalize_activations": "layer_norm"}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 4}),
    "topk_rescale": (TopKSAE, TopKSAEConfig, {"k": 4, "rescale_acts_by_decoder_norm": True}),
    "gated": (GatedSAE, GatedSAEConfig, {"apply_b_dec_to_input": False}),
}


def make_v6(name, sae_cls, cfg_cls, kwargs, seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post",
                                                                model_name="tiny-llama"), **kwargs)
    sae = sae_cls(cfg)
    _randomise(sae, gen)
    path = OUT / name
    shutil.rmtree(path, ignore_errors=True)
    sae.save_model(path)
    reloaded = SAE.load_from_disk(path)    # expectations from what sae-lens reads back
    exp = _expected(reloaded, gen, with_decode_rand=cfg.normalize_activations == "none")
    save_file(exp, str(path / "expected.safetensors"))


def make_pre6_topk(seed):
    """An sae-lens 3.x/5.x style config: hook_point, activation_fn_str + kwargs, bool normalisation."""
    gen = torch.Generator().manual_seed(seed)
    path = OUT / "pre6_topk"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    weights = {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.5,
               "b_enc": torch.randn(D_SAE, generator=gen) * 0.3,
               "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.5,
               "b_dec": torch.randn(D_IN, generator=gen) * 0.3}
    save_file(weights, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "model_name": "tiny-llama", "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
           "hook_point_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
           "apply_b_dec_to_input": True, "normalize_activations": False, "context_size": 128,
           "sae_lens_training_version": "3.13.0"}
    (path / "cfg.json").write_text(json.dumps(cfg))
    sae = SAE.load_from_disk(path)
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == 5
    save_file(_expected(sae, gen, with_decode_rand=True), str(path / "expected.safetensors"))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, (sae_cls, cfg_cls, kwargs)) in enumerate(CASES.items()):
        make_v6(name, sae_cls, cfg_cls, kwargs, seed=100 + i)
    make_pre6_topk(seed=7)
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
