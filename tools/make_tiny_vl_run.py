"""Write what configs/grpo_vl_vgr_cpu.yaml needs: a tiny random Qwen2.5-VL (2 layers, hidden
64, vision tower 2 blocks; tests/models/vl_fixtures.py's shapes) whose word-level tokenizer
covers the synthetic image-QA prompts, and those prompts (tools/make_image_qa_data.py,
32x32 images: 16 image tokens each).

    python tools/make_tiny_vl_run.py          # -> .cache/demo/tiny-qwen2_5-vl, data/generated/image_qa_tiny
    megatron-rl train --config configs/grpo_vl_vgr_cpu.yaml
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompt_words(data_dir: Path) -> list[str]:
    """Every whitespace-separated word of the prompts (image placeholders removed) + answers."""
    from tools.make_image_qa_data import ANSWER_WORDS

    words: list[str] = []
    for split in ("train", "val"):
        for line in (data_dir / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            for m in row["prompt"]:
                words += m["content"].replace("<image>", " ").split()
    return list(dict.fromkeys(words + ANSWER_WORDS + ["The", "answer", "is", "a", "bar", "circle"]))


def write_tokenizer(out_dir: Path, words: list[str]):
    """tests/models/vl_fixtures.py's tokenizer (ChatML-like template, vision specials) over `words`."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.models.vl_fixtures import VL_SPECIALS, write_vl_tokenizer

    template = write_vl_tokenizer(out_dir).chat_template
    specials = ["<unk>", "<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + VL_SPECIALS + words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VL_SPECIALS + ["<|im_end|>"]])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>")
    hf.chat_template = template
    hf.save_pretrained(out_dir)
    return hf, len(vocab)


def main(argv=None) -> None:
    import transformers

    from tests.models.vl_fixtures import _image_processor, tiny_vl_config
    from tools.make_image_qa_data import main as make_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / ".cache/demo/tiny-qwen2_5-vl"))
    ap.add_argument("--data-dir", default=str(ROOT / "data/generated/image_qa_tiny"))
    ap.add_argument("--n-train", type=int, default=256)
    args = ap.parse_args(argv)
    data, out = Path(args.data_dir), Path(args.model_dir)
    make_data(["--out", str(data), "--n-train", str(args.n_train), "--n-val", "16", "--size", "32"])
    out.mkdir(parents=True, exist_ok=True)
    tok, vocab = write_tokenizer(out, prompt_words(data))
    cfg = tiny_vl_config(tok)
    cfg.text_config.vocab_size = vocab
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    model.save_pretrained(out, safe_serialization=True)
    _image_processor().save_pretrained(out)
    print(f"wrote {out} (vocab {vocab}) and {data}")


if __name__ == "__main__":
    main()
