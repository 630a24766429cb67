"""Locating a global decoder layer inside a (possibly wrapped, pipeline-split) Megatron GPTModel,
and a hook that captures its output.

Megatron layers return `(hidden_states, context)`, hidden states sequence-first `[S, B, H]`;
that output is the full residual stream. `layer.layer_number` is global and 1-based, so the
0-indexed layer L of sae-lens hook names is `layer_number == L + 1`.
"""
from __future__ import annotations

from contextlib import contextmanager


def unwrap_chunk(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module      # DDP, Float16Module
    return model


def find_layer(model, layer: int):
    """The TransformerLayer computing 0-indexed global layer `layer`, or None if another pipeline
    stage owns it. `model` may be a list of virtual-pipeline chunks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        decoder = getattr(unwrap_chunk(chunk), "decoder", None)
        if decoder is None:
            raise TypeError(f"{type(chunk).__name__} has no .decoder; expected a Megatron GPTModel")
        for mod in decoder.layers:
            if mod.layer_number == layer + 1:
                return mod
    return None


def num_layers(model) -> int:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return unwrap_chunk(chunks[0]).config.num_layers


def hidden_of(output):
    """Hidden states from a layer's output, which is `(hidden, context)` or a bare tensor."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    pass


@contextmanager
def capture_layer_output(model, layer: int, stop: bool = False):
    """Yield a dict whose `"hidden"` becomes layer `layer`'s output `[S, B, H]` during the forwards
    run inside the block (None on stages without the layer). `stop=True` aborts the forward right
    after the capture (layers above are not run); wrap the call in `run_until_captured`."""
    store: dict = {"hidden": None}
    mod = find_layer(model, layer)
    if mod is None:
        yield store
        return

    def hook(_m, _inp, out):
        store["hidden"] = hidden_of(out).detach()
        if stop:
            raise _StopForward

    handle = mod.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_until_captured(fn, *args, **kwargs):
    """Call `fn`, swallowing the early exit raised by `capture_layer_output(stop=True)`."""
    try:
        return fn(*args, **kwargs)
    except _StopForward:
        return None


__all__ = ["find_layer", "num_layers", "capture_layer_output", "run_until_captured", "hidden_of", "replace_hidden"]
