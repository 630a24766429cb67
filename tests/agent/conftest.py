"""Fixtures for agent tests: an offline byte-level BPE tokenizer, a tiny corpus, a
retriever server on a free loopback port, and a scripted inner rollout engine."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_rl.agent.retriever_server import BM25Index, load_corpus, make_server, serve_in_thread
from megatron_rl.data.batch import Batch

TAGS = ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>",
        "<think>", "</think>", "<calculator>", "</calculator>", "<python>", "</python>"]

CORPUS = [
    {"id": "zorvania", "title": "Zorvania", "text": "Zorvania's capital is Kelmar."},
    {"id": "quillon", "title": "Quillon River", "text": "The Quillon river flows into Lake Ostrel."},
    {"id": "brevik", "title": "Brevik Tower", "text": "Brevik Tower was designed by architect Imra Solenne."},
    {"id": "d1", "title": "Weather", "text": "Rain is common in autumn."},
    {"id": "d2", "title": "Cooking", "text": "Bread needs flour, water and yeast."},
]


class ScriptedEngine:
    """A fake `RolloutEngine`: row with uid U at agent turn t emits `scripts[U][t]`
    (text; `<eos>` in it is the EOS token), cut to `max_new_tokens`. Its log-probs are
    `-(t + 1) - k / 100` for the k-th token, so every token's origin is checkable.
    `on_turn(t)` runs before each call (to kill or restart a server mid-rollout)."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], on_turn=None):
        self.tokenizer, self.scripts, self.on_turn = tokenizer, scripts, on_turn
        self.calls: list[dict] = []

    def generate(self, batch: Batch, sampling):
        assert sampling.n == 1
        turn = batch.samples[0]["agent_turn"]
        if self.on_turn:
            self.on_turn(turn)
        rows, contexts = [], []
        for ids, mask, s in zip(batch["prompt_ids"], batch["prompt_mask"], batch.samples):
            contexts.append(ids[mask.bool()].tolist())
            text = self.scripts[s["uid"]][s["agent_turn"]]
            rows.append(self.tokenizer.encode(text, add_special_tokens=False)[: sampling.max_new_tokens])
        self.calls.append({"turn": turn, "uids": [s["uid"] for s in batch.samples],
                           "contexts": contexts, "sampling": sampling})
        width = max(1, max(len(r) for r in rows))
        out_ids = torch.zeros(len(rows), width, dtype=torch.long)
        out_mask, logprob = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
        for r, toks in enumerate(rows):
            out_ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            out_mask[r, : len(toks)] = 1.0
            logprob[r, : len(toks)] = torch.tensor([-(turn + 1) - k / 100 for k in range(len(toks))])
        return Batch(dict(batch.tensors, response_ids=out_ids, response_mask=out_mask,
                          rollout_logprob=logprob), [dict(s) for s in batch.samples])

    def update_weights(self, named_tensors):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [d["title"] + "\n" + d["text"] for d in CORPUS] * 5 + ["What is the capital of Zorvania?"] * 5
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(TAGS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    return str(path)


class LiveRetriever:
    """A real server on a loopback port that a test can stop and start again."""

    def __init__(self, corpus_path: str):
        self.index = BM25Index(load_corpus(corpus_path))
        self.port = 0
        self.server = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/retrieve"

    def start(self) -> None:
        self.server = make_server(self.index, "127.0.0.1", self.port, default_topk=3)
        self.port = self.server.server_address[1]
        serve_in_thread(self.server)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def retriever(corpus_path):
    live = LiveRetriever(corpus_path)
    yield live
    live.stop()


def prompt_batch(tokenizer, questions: dict[str, str], answers: dict[str, list[str]] | None = None) -> Batch:
    """Left-padded prompts with uid and ground_truth per sample."""
    ids = [tokenizer.encode(q, add_special_tokens=False) for q in questions.values()]
    width = max(len(i) for i in ids)
    prompt_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        prompt_ids[r, width - len(row):] = torch.tensor(row)
        prompt_mask[r, width - len(row):] = 1
    samples = [{"uid": uid, "ground_truth": (answers or {}).get(uid, [])} for uid in questions]
    return Batch({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, samples)
