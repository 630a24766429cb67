"""An offline tokenizer for data tests: a WordLevel vocabulary trained in-test, wrapped
in `PreTrainedTokenizerFast` with a ChatML-style Jinja chat template (one token per word,
so prompt lengths are easy to count)."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["what is one plus two ? give only the number", "user assistant system you are a calculator",
          "a b c d e f g h i j k l m n o p q r s t u v w x y z", "0 1 2 3 4 5 6 7 8 9 + = ####"]


def make_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                 pad_token="<pad>" if with_pad else None)
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_no_pad() -> PreTrainedTokenizerFast:
    return make_tokenizer(with_pad=False)
