"""Safe serialisation of what crosses the bridge and what the async buffer checkpoints: tensors
plus a JSON tree, never pickled objects.

Why: a pickle from a peer or a checkpoint file runs code on load. The wire/file format is one
`torch.save` of `{"tree": <JSON str>, "tensors": [Tensor, ...]}`, read back with
`torch.load(weights_only=True)`. The tree holds JSON values; what JSON cannot say is tagged:
tensors (`{"__tensor": i}`), torch dtypes, tuples, bytes, dicts whose keys are not plain strings,
and the dataclasses of `messages.py` plus `Batch`, `SamplingParams` and weight-sync `Piece`s
(the bucket tables of `BroadcastTransport`), by name, from a fixed
registry: nothing else is built on load. Python floats round-trip exactly through JSON
(shortest repr; NaN/inf included), so sample records come back equal. Anything else
(numpy scalars, sets, arbitrary objects) is refused on the sending side, naming where it sits.
"""
from __future__ import annotations

import dataclasses
import io
import json

import torch

from megatron_rl.async_rl import messages
from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.weight_sync.bucketing import Piece

_CLASSES = {c.__name__: c for c in (Batch, SamplingParams, Piece, messages.GenerateCmd, messages.WeightsCmd,
                                    messages.StopCmd, messages.PushRequest,
                                    messages.GenResult)}
_TAGS = ("__tensor", "__tuple", "__bytes", "__dtype", "__items", "__dataclass")


def pack(obj) -> dict:
    """`obj` as `{"tree": str, "tensors": list[Tensor]}` (tensors only: weights_only-loadable)."""
    tensors: list[torch.Tensor] = []
    tree = _encode(obj, tensors, "obj")
    return {"tree": json.dumps(tree, allow_nan=True), "tensors": tensors}


def unpack(packed: dict):
    """Inverse of `pack`."""
    return _decode(json.loads(packed["tree"]), packed["tensors"])


def dumps(obj) -> torch.Tensor:
    """`obj` as a uint8 tensor (the bridge's payload)."""
    buf = io.BytesIO()
    torch.save(pack(obj), buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def loads(data: torch.Tensor):
    return unpack(torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True))


def save(obj, path) -> None:
    torch.save(pack(obj), path)


def load(path):
    return unpack(torch.load(path, weights_only=True, map_location="cpu"))


def _encode(obj, tensors: list, where: str):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()                      # a view: send its elements, not the whole storage
        tensors.append(t)
        return {"__tensor": len(tensors) - 1}
    if isinstance(obj, torch.dtype):
        return {"__dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, bytes):
        data = torch.frombuffer(bytearray(obj), dtype=torch.uint8) if obj else torch.zeros(0, dtype=torch.uint8)
        return {"__bytes": _encode(data, tensors, where)}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"__items": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                            for k, v in obj.items()]}
    name = type(obj).__name__
    if dataclasses.is_dataclass(obj) and _CLASSES.get(name) is type(obj):
        return {"__dataclass": name, "fields": {f.name: _encode(getattr(obj, f.name), tensors, f"{where}.{f.name}")
                                                for f in dataclasses.fields(obj)}}
    raise TypeError(f"async_rl codec: {where} is a {type(obj).__module__}.{name}; only tensors, JSON values "
                    f"(None/bool/int/float/str, lists, dicts), tuples, bytes and {sorted(_CLASSES)} cross the "
                    "bridge or enter the async buffer checkpoint (convert it to one of those)")


def _decode(node, tensors: list):
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor" in node:
        return tensors[node["__tensor"]]
    if "__tuple" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple"])
    if "__bytes" in node:
        return _decode(node["__bytes"], tensors).numpy().tobytes()
    if "__dtype" in node:
        dtype = getattr(torch, node["__dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"async_rl codec: {node['__dtype']!r} is not a torch dtype")
        return dtype
    if "__items" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__items"]}
    if "__dataclass" in node:
        cls = _CLASSES.get(node["__dataclass"])
        if cls is None:
            raise ValueError(f"async_rl codec: unknown dataclass {node['__dataclass']!r} (known: {sorted(_CLASSES)})")
        return cls(**{k: _decode(v, tensors) for k, v in node["fields"].items()})
    return {k: _decode(v, tensors) for k, v in node.items()}
