"""The bridge / buffer codec: sample records and tensors come back exactly, and nothing but
tensors + JSON is ever loaded (a pickled object is refused)."""
import io
import math

import pytest
import torch

from megatron_rl.async_rl import codec
from megatron_rl.async_rl.messages import GenerateCmd, GenResult, StopCmd, WeightsCmd
from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.weight_sync.bucketing import Piece


def _batch() -> Batch:
    base = torch.arange(24, dtype=torch.long).view(4, 6)
    samples = [{"uid": f"train.jsonl:{i}", "ground_truth": "42", "score": 0.1 + i / 3, "nan": math.nan,
                "inf": -math.inf, "flag": bool(i % 2), "n": 2 ** 62 + i, "none": None, "pair": (i, "x"),
                "by_int": {1: "a", (2, 3): [0.5]}, "__tensor": "a key that looks like a tag",
                "blob": b"\x00\xff" * i, "turns": [{"role": "user", "content": "hi"}], "img": torch.ones(2, i + 1)}
               for i in range(4)]
    return Batch({"prompt_ids": base[:, :3], "response_mask": torch.rand(4, 5, dtype=torch.float64),
                  "policy_version": torch.tensor([[0, 0, 1, 1, -1]] * 4),
                  "rollout_logprob": torch.randn(4, 5).to(torch.bfloat16)}, samples)


def _same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, Batch):
        _same(a.tensors, b.tensors)
        _same(a.samples, b.samples)
    else:
        assert a == b


def test_messages_round_trip_exactly():
    batch = _batch()
    sp = SamplingParams(temperature=0.7, top_p=0.9, n=2, stop=["</a>"], seed=3)
    for msg in (GenResult(5, 1, 2, batch, 3, 0.125, 1 / 3), GenerateCmd(7, batch, sp, 2), WeightsCmd(4), StopCmd()):
        got = codec.loads(codec.dumps(msg))
        assert type(got) is type(msg)
        for f in msg.__dataclass_fields__:
            _same(getattr(msg, f), getattr(got, f))
    pieces = {"pieces": [Piece("model.embed_tokens.weight", (10, 4), torch.bfloat16, 0, 80, 0, 80)], "bytes": 80}
    assert codec.loads(codec.dumps(pieces)) == pieces


def test_views_travel_without_their_whole_storage():
    big = torch.zeros(1000, 1000)
    assert codec.dumps({"row": big[3]}).numel() < 20_000


def test_unsupported_values_are_refused_by_where_they_sit():
    bad = Batch({"x": torch.zeros(2, 1)}, [{"uid": "a"}, {"uid": "b", "tags": {"s"}}])
    with pytest.raises(TypeError, match=r"obj.batch.samples\[1\]\['tags'\] is a builtins.set"):
        codec.dumps(GenResult(1, 0, 1, bad, 0, 0.0, 0.0))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickled_object_is_never_loaded(tmp_path):
    buf = io.BytesIO()
    torch.save({"tree": "null", "tensors": [], "x": _Evil()}, buf)
    with pytest.raises(Exception, match="Weights only load failed"):
        codec.loads(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    torch.save(_Evil(), tmp_path / "buf.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        codec.load(tmp_path / "buf.pt")
