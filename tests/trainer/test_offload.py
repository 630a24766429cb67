"""Offload / onload (models/offload.py): the reference with `ref.offload` gives bit-identical
log-probs and holds no weight bytes between passes; a trainable policy's grads, optimizer
state and weights survive a round trip so the next update is bit-identical."""
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import make_tiny_hf
from tests.trainer.test_packed_training import ragged_batch


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from megatron_rl.parallel import init_distributed

    init_distributed()
    return make_tiny_hf(tmp_path_factory.mktemp("offload_hf"), "llama", tie=True)


def _cfg(hf, *extra):
    from megatron_rl.config import load_experiment_config

    return load_experiment_config(None, [f"model.path={hf}", "model.layer_spec=local", "model.dtype=float32",
                                         "actor.micro_batch_size=2", "actor.fused_loss=off", *extra])


def _plan(cfg):
    from megatron_rl.plan import resolve_plan

    return resolve_plan(cfg, world_size=1, device="cuda" if torch.cuda.is_available() else "cpu")


def _frozen(cfg, offload):
    from megatron_rl.trainer.build import build_frozen_policy

    return build_frozen_policy(cfg, _plan(cfg), offload=offload)


def _storages(module):
    """The real storages behind the parameters (kept views: the offloader swaps `p.data`)."""
    return [p.data for p in module.parameters()]


def test_offloaded_reference_gives_bit_identical_logprobs_and_holds_no_weights(hf):
    from megatron_rl.trainer.phases import ref_logprobs

    batch = ragged_batch()
    plain = _frozen(_cfg(hf), offload=False)
    expect, _ = plain.compute_logprobs(batch)
    ref = _frozen(_cfg(hf, "ref.offload=true"), offload=True)
    model = ref.model
    with ref.onloaded():
        views = _storages(model)                   # the resident tensors, to watch their storages
        emb = model.embedding.word_embeddings.weight
        assert model.shared_embedding_or_output_weight() is emb
    assert ref.offloader.is_offloaded
    assert all(v.untyped_storage().nbytes() == 0 for v in views)
    assert ref.offloader.resident_bytes == 0 and ref.offloader.last.bytes_freed > 0
    for _ in range(2):                             # the phase: onload -> compute -> offload, twice
        tr = SimpleNamespace(reference=ref)
        ref_logprobs(tr, batch)
        assert torch.equal(batch["ref_logprob"], expect)
        assert ref.offloader.is_offloaded and all(v.untyped_storage().nbytes() == 0 for v in views)
    ref.onload()
    assert model.shared_embedding_or_output_weight() is emb and model.output_layer.weight is None
    assert all(p.data_ptr() == v.data_ptr() for p, v in zip(model.parameters(), views))


def test_forward_while_offloaded_names_the_offloader(hf):
    ref = _frozen(_cfg(hf), offload=True)
    with pytest.raises(RuntimeError, match="offloaded"):
        ref.compute_logprobs(ragged_batch())


def test_shared_parameters_and_views_stay_shared_after_onload():
    from megatron_rl.models.offload import WeightOffloader

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4, device=dev), torch.nn.Linear(4, 4, device=dev)
    b.weight = a.weight                                         # tied, as embedding/output
    flat = torch.randn(40, device=dev)
    a.bias.data = flat[3:7]                                     # a view into a larger buffer (DDP layout)
    model = torch.nn.ModuleList([a, b])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    off = WeightOffloader(model)
    stats = off.offload()
    assert stats.bytes_copied == 4 * (16 + 4 + 40) and flat.untyped_storage().nbytes() == 0
    assert off.offload().bytes_copied == 0                      # idempotent
    off.onload()
    assert off.onload().bytes_copied == 0 and not off.is_offloaded
    assert b.weight is a.weight
    flat[3] = 5.0
    assert a.bias[0].item() == 5.0                              # still a view of `flat`
    a.bias.data[0] = before["0.bias"][0]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _actor(hf, dtype):
    from megatron_rl.trainer.build import build_actor

    cfg = _cfg(hf, f"model.dtype={dtype}", "actor.optim.lr=1e-3", "actor.optim.eps=1e-3")
    return build_actor(cfg, _plan(cfg))


def _update(policy, batch):
    from megatron_rl.algos.config import AlgosConfig

    return policy.update(batch, AlgosConfig(), mini_batch_size=0, ppo_epochs=1, use_ref=False, seed=0)


def _adam_state(policy):
    from megatron_rl.models.offload import _torch_optimizers

    return [v.clone() for opt in _torch_optimizers(policy.optimizer) for s in opt.state.values()
            for v in s.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Megatron's Float16 optimizer wraps CUDA tensors only"))])
def test_training_state_round_trip_gives_a_bit_identical_next_update(hf, dtype):
    """float32: Megatron's FP32Optimizer (its params are the model's, moved with the weights);
    bfloat16: fp32 master params + moments as optimizer state."""
    from megatron_rl.models.offload import TrainingStateOffloader

    batch = ragged_batch()
    ref_run, run = _actor(hf, dtype), _actor(hf, dtype)
    run.offloader = TrainingStateOffloader(run.ddp, run.optimizer, offload_weights=True)
    _update(ref_run, batch), _update(run, batch)
    grads = [b.grad_data for b in run.ddp.buffers]
    moments = [t.data for _, t in run.offloader._opt._collect() if t.is_cuda or not torch.cuda.is_available()]
    weights = _storages(run.model)
    state = _adam_state(run)
    run.offload()
    assert run.offloader.is_offloaded
    assert all(t.untyped_storage().nbytes() == 0 for t in grads + moments + weights)
    stats = run.offloader.last
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    assert stats.bytes_freed >= grad_bytes + stats.bytes_copied and stats.bytes_copied > 0
    run.onload()
    assert not run.offloader.is_offloaded
    run.finish_onload()                 # Policy.onload overlaps the optimizer state's copy until the step
    assert all(torch.equal(a, b) for a, b in zip(_adam_state(run), state))
    second = [p.detach().clone() for p in ref_run.model.parameters()]
    m_ref, m = _update(ref_run, batch), _update(run, batch)
    assert m_ref == m
    moved = max((p.detach().float() - q.float()).abs().max().item()
                for p, q in zip(ref_run.model.parameters(), second))
    assert moved > 0                                            # the second update changed the weights
    for (n, p), q in zip(run.model.named_parameters(), ref_run.model.parameters()):
        assert torch.equal(p, q), n


def test_training_state_onloaded_scope_re_offloads_what_was_offloaded(hf):
    from megatron_rl.models.offload import TrainingStateOffloader

    run = _actor(hf, "float32")
    _update(run, ragged_batch())
    off = TrainingStateOffloader(run.ddp, run.optimizer)
    off.offload()
    assert not off.weights.is_offloaded
    with off.onloaded():
        assert not off.is_offloaded
    assert off.is_offloaded and not off.weights.is_offloaded
    off.offload(weights=True)
    with off.onloaded():
        pass
    assert off.weights.is_offloaded
    off.onload()


def _optimizer_owned(off):
    """The optimizer-state tensors the offloader moves (fp32: Adam moments; bf16: also master params)."""
    skip = off._not_optimizer_owned()
    return [t for _, t in off._opt._collect() if (t.is_cuda or not torch.cuda.is_available())
            and t.untyped_storage().data_ptr() not in skip]


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Megatron's Float16 optimizer wraps CUDA tensors only"))])
def test_overlapped_onload_gives_a_bit_identical_next_update(hf, dtype):
    """Policy.onload copies the optimizer state on a side stream (CUDA; synchronously on CPU) and
    keeps its tensors placeholders until the optimizer step waits: the update matches one without
    the round trip, also after a pending onload is offloaded again (an update that never came)."""
    from megatron_rl.models.offload import TrainingStateOffloader

    batch = ragged_batch()
    ref_run, run = _actor(hf, dtype), _actor(hf, dtype)
    run.offloader = TrainingStateOffloader(run.ddp, run.optimizer)
    _update(ref_run, batch), _update(run, batch)
    owned = _optimizer_owned(run.offloader)
    assert owned
    state = _adam_state(run)
    for _ in range(2):                                          # the second round: offload while pending
        run.offload()
        run.onload()
        assert run.offloader.onload_pending and not run.offloader.is_offloaded
        assert all(t.numel() == 0 for t in owned)               # placeholders until the wait
        assert run.offloader.weights.resident_bytes > 0
    m_ref, m = _update(ref_run, batch), _update(run, batch)
    assert not run.offloader.onload_pending and all(t.numel() > 0 for t in owned)
    assert m_ref == m
    for (n, p), q in zip(run.model.named_parameters(), ref_run.model.parameters()):
        assert torch.equal(p, q), n
    assert not all(torch.equal(a, b) for a, b in zip(_adam_state(run), state))   # the step moved the moments
    perf = run.onload_metrics()
    if torch.cuda.is_available():
        assert perf["perf/onload_copy_s"] > 0 and min(perf["perf/onload_wait_s"], perf["perf/onload_overlapped_s"]) >= 0
    else:
        assert perf == {}


def test_state_dict_waits_for_a_pending_onload(hf):
    from megatron_rl.models.offload import TrainingStateOffloader

    run = _actor(hf, "float32")
    run.offloader = TrainingStateOffloader(run.ddp, run.optimizer)
    _update(run, ragged_batch())
    expect = _adam_state(run)
    run.offload()
    run.onload()
    state = run.state_dict()["optimizer"]     # FP32Optimizer on CPU; Megatron's distributed optimizer on CUDA
    assert not run.offloader.onload_pending
    got = _tensors(state)
    assert all(torch.equal(a, b) for a, b in zip(_adam_state(run), expect))
    assert all(t.numel() > 0 for t in got)   # no placeholder reached the state dict
    if not torch.cuda.is_available():        # the distributed optimizer (CUDA) keeps its moments out of state_dict()
        assert len(got) >= len(expect)


def _tensors(obj) -> list:
    """Every tensor in a nested optimizer state dict (layouts differ between Megatron's optimizers)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="side-stream copies need CUDA")
def test_overlapped_onload_is_waited_on_by_the_current_stream_not_the_host():
    """1 GiB comes back on the side stream: onload returns before the copy is done, and a read
    on the current stream right after finish_onload sees every byte (the event wait works)."""
    from megatron_rl.models.offload import StorageOffloader

    x = torch.randn(2**28, device="cuda")
    expect = x.clone()
    off = StorageOffloader(lambda: [("x", x)], "test")
    off.offload()
    launched = off.onload(overlap=True)
    assert x.numel() == 0 and off.onload_pending
    off.finish_onload()
    assert torch.equal(x, expect)
    perf = off.overlap_stats()
    assert perf.copy_s > launched.seconds and perf.wait_s > 0.5 * perf.copy_s, (perf, launched)
    assert off.overlap_stats() is None                          # read once
