"""Weight sync: bucketing splits and reassembles tensors byte-exactly, and the actor's
weights synced from TP=2 / PP=2 (colocated IPC transport) or TP=1 (broadcast transport)
into a separate TP=1 native-engine copy reproduce the actor's logits."""
import types

import pytest
import torch
import torch.multiprocessing as mp

from megatron_rl.rollout.weight_sync import (ALIGN, BucketReceiver, ColocatedTransport, iter_buckets,
                                             receive_bucket, sync_weights)
from tests.helpers import make_tiny_hf, run_multiproc


def _named():
    g = torch.Generator().manual_seed(0)
    return [("small", torch.randn(3, 5, generator=g)), ("big", torch.randn(40, 33, generator=g)),
            ("half", torch.randn(7, generator=g).bfloat16()), ("ints", torch.arange(11)), ("empty", torch.zeros(0, 4))]


def _roundtrip(buckets, copy=True):
    got = {}
    rx = BucketReceiver(lambda named: got.update({n: t.clone() for n, t in named}), copy=copy)
    for b in buckets:
        rx.add(b)
    rx.finish()
    return got


def test_rollout_bucket_smaller_than_largest_tensor_splits_and_reassembles():
    named = _named()
    big_bytes = 40 * 33 * 4
    buckets = list(iter_buckets(iter(named), 1024, reuse_buffer=False))
    assert big_bytes > 1024
    split = [p for b in buckets for p in b.pieces if p.name == "big"]
    assert len(split) == 6 and sum(p.nbytes for p in split) == big_bytes      # 5280 B over 1024 B buckets
    assert all(b.used <= 1024 for b in buckets)
    got = _roundtrip(buckets)
    for name, t in named:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_rollout_bucket_buffer_reuse_gives_the_same_tensors():
    named = _named()
    got = {}
    rx = BucketReceiver(lambda nt: got.update({n: t.clone() for n, t in nt}))
    for b in iter_buckets(iter(named), 2048, reuse_buffer=True):
        rx.add(b)
    rx.finish()
    assert all(torch.equal(got[n], t) for n, t in named)


def test_rollout_unsplit_pieces_are_aligned_views():
    buckets = list(iter_buckets(iter(_named()), 1 << 16))
    assert len(buckets) == 1
    assert [p.offset % ALIGN for p in buckets[0].pieces] == [0] * 5


def test_rollout_bucket_dtype_cast_halves_bytes():
    t = torch.randn(64, 8)
    b = next(iter_buckets(iter([("w", t)]), 1 << 16, dtype=torch.bfloat16))
    assert b.used == 64 * 8 * 2
    assert torch.equal(_roundtrip([b])["w"], t.bfloat16())


def test_rollout_bucket_below_alignment_is_an_error():
    with pytest.raises(ValueError, match="below the 256 B alignment"):
        next(iter_buckets(iter(_named()), 100))


def test_rollout_receiver_reports_incomplete_tensor():
    buckets = list(iter_buckets(iter([("big", torch.randn(1000))]), 1024))
    rx = BucketReceiver(lambda _: None)
    rx.add(buckets[0])
    with pytest.raises(RuntimeError, match="incomplete tensors.*big.*1024/4000 B"):
        rx.finish()


@pytest.mark.parametrize("ipc", [False, True])
def test_rollout_colocated_transport_delivers_every_tensor(ipc):
    named = _named()
    got = {}
    sink = lambda nt: got.update({n: t.clone() for n, t in nt})  # noqa: E731
    metrics = sync_weights(iter(named), ColocatedTransport(lambda p: receive_bucket(p, sink, key="t"), ipc=ipc),
                           bucket_mb=1024 / 2 ** 20)
    assert all(torch.equal(got[n], t) for n, t in named)
    assert metrics["weight_sync/bytes"] == sum(t.numel() * t.element_size() for _, t in named) == 5442
    assert metrics["weight_sync/tensors"] == 5 and metrics["weight_sync/buckets"] == 6


# --- actor (TP=2 / PP=2) -> separate TP=1 native engine ------------------------------------------

BUCKET_MB = 16384 / 2 ** 20      # 16 KiB: the tiny model's largest tensor (fc1, 64 KiB) is split over 4


def _ids():
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    return ids, am


def _logits(model):
    from megatron_rl.models.forward import gpt_forward
    from megatron_rl.models.schedule import run_microbatches
    from megatron_rl.parallel.collectives import gather_vocab_parallel

    ids, am = _ids()
    with torch.no_grad():
        res = run_microbatches(model, [{"input_ids": ids, "attention_mask": am}],
                               lambda m, mb: gpt_forward(m, mb["input_ids"], mb["attention_mask"]),
                               lambda mb, out: (out.sum() * 0, {"logits": gather_vocab_parallel(out)}),
                               forward_only=True)
    return res[0]["logits"] if res else None


def _perturb(model):
    """An elementwise change, so every layout holds the same full weights afterwards."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.8).add_(0.05)


def _native_engine(hf):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.rollout.native_engine import NativeEngine

    model = load_checkpoint(hf, layer_spec="local")
    return NativeEngine(model, types.SimpleNamespace(eos_token_id=1, pad_token_id=0))


def _engine_proc(hf, port, inbox, acks, out):
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.weight_sync import NativeTransport
    from megatron_rl.rollout.weight_sync.colocated import unpack_payload

    torch.set_num_threads(1)
    init_distributed(rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    engine = _native_engine(hf)
    before = _logits(engine.model)
    transport = NativeTransport(engine)
    transport.begin()
    while (payload := inbox.get()) is not None:
        transport.send(unpack_payload(payload))
        acks.put(True)
    transport.end()
    torch.save({"before": before, "after": _logits(engine.model)}, out)
    destroy_distributed()


def _actor_proc(rank, world, hf, tp, pp, inbox, acks, out):
    import torch.distributed as dist

    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp)
    model = load_checkpoint(hf, layer_spec="local")
    _perturb(model)
    logits = _logits(model)
    if logits is not None and rank == world - 1:
        torch.save(logits, out)

    def deliver(payload):
        inbox.put(payload)
        if payload is not None:
            acks.get()          # the engine is done with the shared buffer before it is refilled

    metrics = sync_weights(iter_hf_weights(model), ColocatedTransport(deliver, ipc=True), bucket_mb=BUCKET_MB,
                           is_sender=dist.get_rank() == 0)
    if dist.get_rank() == 0:
        assert metrics["weight_sync/bytes"] > 0 and metrics["weight_sync/buckets"] > 10
    destroy_distributed()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_rollout_sync_from_parallel_actor_reproduces_logits(tmp_path, tp, pp):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=False)
    ctx = mp.get_context("spawn")
    inbox, acks = ctx.Queue(), ctx.Queue()
    engine = ctx.Process(target=_engine_proc, args=(hf, _free_port(), inbox, acks, str(tmp_path / "engine.pt")))
    engine.start()
    try:
        run_multiproc(_actor_proc, 2, (hf, tp, pp, inbox, acks, str(tmp_path / "actor.pt")))
    finally:
        engine.join(300)
    assert engine.exitcode == 0
    actor, res = torch.load(tmp_path / "actor.pt"), torch.load(tmp_path / "engine.pt")
    assert actor.shape == res["after"].shape == (2, 9, 96)
    assert (res["before"] - actor).abs().max() > 0.1                # the engine really changed
    assert (res["after"] - actor).abs().max() < 1e-5


def _broadcast_proc(rank, world, hf, out):
    import torch.distributed as dist

    from megatron_rl.models import iter_hf_weights, load_checkpoint
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.weight_sync import BroadcastTransport, NativeTransport, TorchDistComm, receive_broadcast

    init_distributed(tp=1, pp=1)       # two data-parallel ranks: 0 = actor, 1 = engine
    comm = TorchDistComm()
    if rank == 0:
        model = load_checkpoint(hf, layer_spec="local")
        _perturb(model)
        actor_logits = _logits(model)
        metrics = sync_weights(iter_hf_weights(model), BroadcastTransport(comm, src=0), bucket_mb=BUCKET_MB)
        dist.broadcast(actor_logits, src=0)
        assert metrics["weight_sync/buckets"] > 10
    else:
        engine = _native_engine(hf)
        transport = NativeTransport(engine)
        transport.begin()
        nbytes = receive_broadcast(comm, transport.send, src=0)
        transport.end()
        actor_logits = torch.empty(2, 9, 96)
        dist.broadcast(actor_logits, src=0)
        torch.save({"diff": (_logits(engine.model) - actor_logits).abs().max().item(), "bytes": nbytes}, out)
    destroy_distributed()


@pytest.mark.multiproc
def test_rollout_broadcast_transport_reproduces_logits(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tie=True)
    run_multiproc(_broadcast_proc, 2, (hf, str(tmp_path / "res.pt")))
    res = torch.load(tmp_path / "res.pt")
    assert res["diff"] < 1e-5
    assert res["bytes"] > 96 * 64 * 4
