"""The vLLM rollout engine: the engine protocol on vLLM's offline `LLM` API (V1).

    engine = VLLMEngine.from_config(cfg, tokenizer)   # rollout.engine: vllm
    batch = engine.generate(prompts, sampling)         # n samples, stop strings, log-probs
    metrics = engine.sync_weights(actor)               # after every update (Trainer loop)

vLLM is imported lazily: this module imports without it, and building the engine
without it raises `ImportError` naming the missing package.

Colocation (`rollout.colocate`): vLLM runs in the trainer's process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`; vLLM TP > 1 spawns workers on the same GPUs) and
sleeps after each generate, so training gets the memory back. `sync_weights` wakes the
weights only, streams the actor's HF-named tensors in buckets (weight_sync/), and the
next `generate` wakes the KV cache. The prefix cache is reset after every weight
update: cached KV from old weights must never be reused.

Routing replay (`model.moe.routing_replay`): vLLM starts with `enable_return_routed_experts`
and each generate returns the top-k experts of every token it fed, as the batch's
`prompt_routed_experts` / `response_routed_experts` (`vllm_convert.completion_routing`); the
trainer's forwards then replay vLLM's routing.

Image prompts (Qwen2-VL / Qwen2.5-VL): rows with `sample["images"]` go with one image pad per
image and the raw images as `multi_modal_data`; a frozen tower is left out of the weight sync
(rollout/vllm_multimodal.py).

Steering (`steering.enable`): the SAE intervention is hooked on every vLLM worker
(steering/vllm_hooks.py, eager mode); with `rollout.vllm.enforce_eager: false`, additive
modes are built into the model instead (steering/vllm_graph.py) so CUDA graphs and
torch.compile stay on. Requests are generated in one call per distinct strength row
(and prompt length, for scope prompt/generated).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from functools import partial
from typing import Iterable

import torch

from megatron_rl.data.batch import Batch
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.vllm_config import VLLMConfig
from megatron_rl.rollout.vllm_device import free_device_bytes, release_torch_cache
from megatron_rl.rollout.vllm_convert import (outputs_to_batch, prompt_token_lists, request_seeds,
                                              steering_groups, vllm_sampling_kwargs)
from megatron_rl.rollout.vllm_multimodal import (attach_images, check_expanded_prompts, vision_skip_prefixes,
                                                 vl_engine_kwargs, without_prefixes)
from megatron_rl.rollout.weight_sync import ColocatedTransport, receive_bucket, sync_weights

log = logging.getLogger(__name__)
MANY_GROUPS = 16                 # warn once when a steered generate needs more vLLM calls than this
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def require_vllm():
    """`import vllm`, or an ImportError that says what to install and why."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.engine=vllm needs the 'vllm' package (0.26 for torch 2.11), which is not "
                          f"importable here ({e}); install it or use rollout.engine=native") from None
    return vllm


def _load_on_worker(payload, model) -> int:
    """Runs on each vLLM worker (through `llm.apply_model`)."""
    return receive_bucket(payload, lambda named: model.load_weights(iter(named)), key="vllm")


class VLLMEngine:
    def __init__(self, llm, tokenizer, config: VLLMConfig | None = None, *, colocate: bool = True,
                 bucket_mb: float = 256, dtype: torch.dtype | None = None, steering_scope: str | None = None,
                 routing_layers: tuple[int, ...] | None = None, skip_prefixes: tuple[str, ...] = ()):
        from megatron_rl.rollout.native_engine import eos_token_ids

        self.llm, self.tokenizer = llm, tokenizer
        self.cfg = config or VLLMConfig()
        self.colocate, self.bucket_mb, self.dtype = colocate, bucket_mb, dtype
        self.steering_scope = steering_scope          # None: no steering hook attached
        self.steering_enabled = True                  # set_steering_enabled(False) turns the hooks into no-ops
        self.eos_ids = eos_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.state = "awake"                          # awake | asleep | weights (weights awake, KV asleep)
        self.weights_stale = False                    # level-2 sleep dropped the weights
        self._wake_need: int | None = None            # bytes vLLM's last full sleep freed (vllm_device.py)
        self._weights_wake_metrics: dict[str, float] = {}   # the cache release before the weights' wake
        self._broadcast = None
        self._steer_key = None                        # steering state the workers hold now (None: unknown)
        self._warned_groups = False
        self.per_request = False                      # steering rows travel with the requests (graph mode)
        self.last_metrics: dict[str, float] = {}
        self.routing_layers = routing_layers          # MoE layers whose routing vLLM returns (None: not asked)
        self.skip_prefixes = tuple(skip_prefixes)     # HF names never synced (a frozen vision tower: visual.)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, tokenizer) -> "VLLMEngine":
        vllm = require_vllm()
        r = cfg.rollout
        v = getattr(r, "vllm", None) or VLLMConfig()
        if isinstance(v, dict):
            v = VLLMConfig(**v)
        v = spmd_defaults(v)
        steer = getattr(cfg, "steering", None)
        steering = steering_intervention(steer) if getattr(steer, "enable", False) else None
        if v.enforce_eager is None:      # CUDA graphs unless a non-additive steering mode needs hooks
            from megatron_rl.steering.vllm_hooks import ADDITIVE

            v = dataclasses.replace(v, enforce_eager=steering is not None and steering[0].name not in ADDITIVE)
        if r.colocate:   # the engine core in this process: weight buckets and steering state pass by reference
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        dtype = v.dtype or cfg.model.dtype
        max_len = v.max_model_len or max(512, cfg.data.max_prompt_length + r.max_new_tokens)
        kwargs = dict(model=cfg.model.path, tokenizer=cfg.model.tokenizer_path or cfg.model.path, dtype=dtype,
                      tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                      enforce_eager=v.enforce_eager, enable_sleep_mode=bool(r.colocate and v.sleep_level),
                      seed=v.seed, max_model_len=max_len, enable_prefix_caching=v.enable_prefix_caching,
                      logprobs_mode=v.logprobs_mode, generation_config="vllm")
        if v.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = v.distributed_executor_backend
        routing_layers = replay_layers(cfg)
        if routing_layers is not None:
            kwargs["enable_return_routed_experts"] = True
        if steering is not None and not v.enforce_eager:
            from megatron_rl.steering.vllm_graph import graph_overrides, register_steered_arch

            register_steered_arch()
            kwargs["hf_overrides"] = graph_overrides(cfg.model.path, steering[1], steering[0].name)
        kwargs.update(vl_engine_kwargs(cfg, kwargs["tokenizer"]))   # image prompts (vllm_multimodal.py)
        extra = dict(v.extra_args)
        if "hf_overrides" in extra and "hf_overrides" in kwargs:
            kwargs["hf_overrides"] = {**extra.pop("hf_overrides"), **kwargs["hf_overrides"]}
        kwargs.update(extra)
        llm = vllm.LLM(**kwargs)
        engine = cls(llm, tokenizer, v, colocate=r.colocate, bucket_mb=r.weight_sync_bucket_mb,
                     dtype=_DTYPES.get(dtype), routing_layers=routing_layers, skip_prefixes=vision_skip_prefixes(cfg))
        if steering is not None:
            engine.attach_intervention(steering[0], steering[1], steer.scope)
        return engine

    def attach_intervention(self, intervention, layer: int, scope: str = "all") -> None:
        """Hook (eager) or bind (CUDA-graph mode) the intervention on every vLLM worker."""
        hooks = self.llm.apply_model(partial(_attach_on_worker, intervention=intervention, layer=layer, scope=scope,
                                             graph=not self.cfg.enforce_eager))
        self.steering_scope = scope
        # Every worker maps tokens to request slots: one vLLM call per generate, rows carry their strengths.
        self.per_request = bool(hooks) and all(hooks)

    def detach_steering(self) -> None:
        """Remove the intervention from every worker; later generates are unsteered."""
        from megatron_rl.steering.vllm_hooks import detach_vllm_steering

        self.llm.apply_model(detach_vllm_steering)
        self.steering_scope, self._steer_key, self.per_request = None, None, False
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def set_steering_enabled(self, enabled: bool) -> None:
        """Steering on/off for the following generate calls (applied per group there)."""
        self.steering_enabled = bool(enabled)

    # --- protocol ----------------------------------------------------------------------------
    def generate(self, batch: Batch, sampling: SamplingParams) -> Batch:
        """`last_metrics` gets the call's split (`perf/vllm_wake_s`, `_generate_s`, `_outputs_s`,
        `_sleep_s`): host wall times, no extra synchronisation (vLLM returns finished outputs;
        wake and sleep return when their copies are done)."""
        import vllm

        t0 = time.perf_counter()
        wake_metrics = self._wake_for_generate()
        t_wake = time.perf_counter() - t0
        prompts = prompt_token_lists(batch)
        # One seed per prompt (the step's seed is this DP rank's), or None: vLLM's engine generator
        # (rollout.vllm.per_request_seed says what was measured).
        seeds = request_seeds(sampling, len(batch)) if self.cfg.per_request_seed else [None] * len(batch)
        kwargs = [vllm_sampling_kwargs(sampling, s, self.eos_ids) for s in seeds]
        requests = [{"prompt_token_ids": p} for p in prompts]
        image_rows = attach_images(batch, requests, self._image_pad_id)
        outputs: list = [None] * len(batch)
        self.last_metrics = {}
        if self.steering_scope is None or self.per_request:
            groups = [(None, None, list(range(len(batch))))]
            if self.per_request:
                self._attach_request_steering(batch, kwargs, requests)
        else:
            groups = steering_groups(batch, by_prompt_len=self.steering_scope != "all")
            self.last_metrics = {"rollout/vllm_steering_calls": float(len(groups))}
            if len(groups) > MANY_GROUPS and not self._warned_groups:
                self._warned_groups = True
                log.warning("vLLM steering: %d generate calls for %d rows (one per distinct strength row%s); "
                            "vLLM batches only within a call. Per-sample strengths run in one call with "
                            "rollout.vllm.enforce_eager=false (additive modes) or on rollout.engine=native",
                            len(groups), len(batch),
                            " and prompt length" if self.steering_scope != "all" else "")
        params = [vllm.SamplingParams(**kw) for kw in kwargs]
        t0 = time.perf_counter()
        for strengths, plen, idx in groups:
            if self.steering_scope is not None and not self.per_request:
                self._set_steering(strengths, plen)
            res = self.llm.generate([requests[i] for i in idx], [params[i] for i in idx], use_tqdm=False)
            for i, o in zip(idx, res):
                outputs[i] = o
        t_gen = time.perf_counter() - t0
        self.last_metrics.update(wake_metrics)
        t0 = time.perf_counter()
        check_expanded_prompts(prompts, outputs, image_rows)
        out = outputs_to_batch(batch, outputs, sampling.n, self.pad_id, logprobs=sampling.logprobs,
                               moe_layers=self.routing_layers)
        t_out = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.colocate and self.cfg.sleep_level:
            self.sleep()
        self.last_metrics.update({"perf/vllm_wake_s": t_wake, "perf/vllm_generate_s": t_gen,
                                  "perf/vllm_outputs_s": t_out, "perf/vllm_sleep_s": time.perf_counter() - t0})
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Load full HF-named tensors (any device) into every vLLM worker, bucketed."""
        self._wake_weights()
        named_tensors = without_prefixes(named_tensors, self.skip_prefixes)
        if self.cfg.transport == "broadcast":
            metrics = sync_weights(named_tensors, self._broadcast_transport(), bucket_mb=self.bucket_mb,
                                   dtype=self.dtype, device=torch.device("cuda", torch.cuda.current_device()))
        else:
            transport = ColocatedTransport(lambda p: self.llm.apply_model(partial(_load_on_worker, p)),
                                           ipc=self.workers_in_other_processes)
            metrics = sync_weights(named_tensors, transport, bucket_mb=self.bucket_mb, dtype=self.dtype)
        self.weights_stale = False
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        return metrics

    @property
    def workers_in_other_processes(self) -> bool:
        """vLLM TP > 1 spawns worker processes (bucket handles go by CUDA IPC), except under
        `external_launcher` (SPMD: each trainer rank hosts its own TP rank's worker)."""
        return self.cfg.tensor_parallel_size > 1 and self.cfg.distributed_executor_backend != "external_launcher"

    def sync_weights(self, actor) -> dict[str, float]:
        """The Trainer's hook after every update: the actor's weights (any TP/PP) into vLLM."""
        from megatron_rl.models.loading import iter_hf_weights

        model = getattr(actor, "chunks", actor)     # a Policy's chunk list, or a bare (DDP-wrapped) model
        return self.update_weights(iter_hf_weights(model))

    def sleep(self) -> None:
        if self.state != "asleep" and self.cfg.sleep_level:
            free = free_device_bytes()
            self.llm.sleep(level=self.cfg.sleep_level)
            if free is not None and self.state == "awake":      # what the next full wake takes back
                self._wake_need = max(free_device_bytes() - free, 0)
            self.state = "asleep"
            self._steer_key = None      # sleep drops the KV cache; level 2 also the steering buffers
            self.weights_stale = self.cfg.sleep_level >= 2

    def wake(self) -> dict[str, float]:
        """Wake for generation; torch's cached blocks go back first (vllm_device.py says why)."""
        metrics = self._release_torch_cache() if self.state != "awake" else {}
        first = self._weights_wake_metrics if self.state == "weights" else {}
        if first and metrics:            # the weights woke (for the sync) after a first release: count both
            metrics = {**first, "perf/torch_released_gib": first["perf/torch_released_gib"]
                       + metrics["perf/torch_released_gib"]}
        if self.state == "asleep":
            self.llm.wake_up()
        elif self.state == "weights":
            self.llm.wake_up(tags=["kv_cache"])
        self.state = "awake"
        return metrics

    # --- internals ----------------------------------------------------------------------------
    def _release_torch_cache(self) -> dict[str, float]:
        """Before a wake from full sleep (weights and KV together need `_wake_need`)."""
        return release_torch_cache(self.cfg.release_torch_cache, self._wake_need)

    def _image_pad_id(self) -> int:
        from megatron_rl.data.multimodal import VisionTokens

        return VisionTokens.of(self.tokenizer).pad

    def _wake_weights(self) -> None:
        if self.state == "asleep":
            self._weights_wake_metrics = self._release_torch_cache()
            self.llm.wake_up(tags=["weights"])
            self.state = "weights"

    def _wake_for_generate(self) -> dict[str, float]:
        if self.weights_stale:
            raise RuntimeError("vLLM slept at level 2 (weights dropped) and no weight sync followed; "
                               "call sync_weights(actor) before generate, or use rollout.vllm.sleep_level=1")
        return self.wake()

    def _attach_request_steering(self, batch: Batch, kwargs: list[dict], requests: list[dict]) -> None:
        """Per-request mode: each request carries its strength row (`extra_args`) and a prefix-cache
        salt of that row, so cached KV is shared only between requests steered alike."""
        from megatron_rl.steering.vllm_graph import EXTRA_KEY

        rows = batch.get("steer_strengths")
        for i, (kw, req) in enumerate(zip(kwargs, requests)):
            row = None if rows is None else [float(x) for x in torch.as_tensor(rows[i]).reshape(-1).tolist()]
            spec = {"strengths": row, "enabled": self.steering_enabled}
            kw["extra_args"] = {**(kw.get("extra_args") or {}), EXTRA_KEY: spec}
            req["cache_salt"] = f"mrl-steer:{self.steering_enabled}:{row}"
        self.last_metrics = {"rollout/vllm_steering_calls": 1.0}

    def _set_steering(self, strengths, prompt_len) -> None:
        """Send the group's steering state to every worker if it changed. A change also resets
        the prefix cache: cached prompt KV was computed under the old steering and would
        otherwise be reused (steering at layer L changes the KV of every later layer)."""
        from megatron_rl.steering.vllm_hooks import set_vllm_steering

        key = (None if strengths is None else tuple(strengths), prompt_len, self.steering_enabled)
        if key == self._steer_key:
            return
        s = torch.tensor(strengths) if strengths is not None else None
        self.llm.apply_model(partial(set_vllm_steering, strengths=s, prompt_len=prompt_len,
                                     enabled=self.steering_enabled))
        if self._steer_key is not None and hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        self._steer_key = key

    def _broadcast_transport(self):
        """Separate GPUs: one stateless NCCL group, trainer = rank 0, vLLM worker r = rank 1 + r.
        Joined lazily on the first sync; each sync runs the workers' receive loop in a thread
        (the in-process executor blocks its caller) while this thread broadcasts."""
        from megatron_rl.rollout.weight_sync import BroadcastTransport, PyNcclComm

        c = self.cfg
        if not c.broadcast_port:
            raise ValueError("rollout.vllm.transport=broadcast needs rollout.vllm.broadcast_port")
        world = 1 + c.tensor_parallel_size
        if self._broadcast is None:
            t = threading.Thread(target=self.llm.apply_model,
                                 args=(partial(_join_broadcast, c.broadcast_host, c.broadcast_port, world),))
            t.start()
            comm = PyNcclComm(c.broadcast_host, c.broadcast_port, 0, world, torch.cuda.current_device())
            t.join()
            self._broadcast = comm
        return _ThreadedBroadcast(BroadcastTransport(self._broadcast, 0), self.llm)


def _attach_on_worker(model, **kwargs) -> bool:
    """Worker side of `attach_intervention`; True when this worker steers per request."""
    from megatron_rl.steering.vllm_hooks import attach_vllm_steering

    return bool(getattr(attach_vllm_steering(model, **kwargs), "per_request", False))


def replay_layers(cfg) -> tuple[int, ...] | None:
    """Global indices of the MoE layers (the L dimension of the routing tensors) when
    `model.moe.routing_replay` is on, else None."""
    moe = getattr(cfg.model, "moe", None)
    if not (moe is not None and moe.routing_replay):
        return None
    from megatron_rl.models.hf_config import arch_from_hf_config
    from megatron_rl.models.weight_mapping import is_moe_layer

    arch = arch_from_hf_config(cfg.model.path)
    if not arch.is_moe:
        raise ValueError(f"model.moe.routing_replay=true: {cfg.model.path} is a dense model "
                         f"({arch.hf_architecture}), it has no routing to replay")
    return tuple(i for i in range(arch.num_layers) if is_moe_layer(arch, i))


def spmd_layout_error(dp_ranks: list[int], vllm_tp: int) -> str | None:
    """Under `external_launcher` vLLM groups contiguous torch ranks into TP groups of size
    `vllm_tp` (layout ExternalDP x TP); each group must run the same prompts, i.e. lie inside
    one trainer data-parallel rank. `dp_ranks[r]` is rank r's trainer DP rank."""
    world = len(dp_ranks)
    if world % vllm_tp:
        return f"world size {world} is not a multiple of rollout.vllm.tensor_parallel_size={vllm_tp}"
    for start in range(0, world, vllm_tp):
        spanned = sorted(set(dp_ranks[start:start + vllm_tp]))
        if len(spanned) > 1:
            return (f"vLLM TP group of ranks {start}..{start + vllm_tp - 1} spans trainer data-parallel ranks "
                    f"{spanned}, which get different prompts; choose rollout.vllm.tensor_parallel_size so that "
                    f"each group of that many consecutive ranks shares one DP rank (e.g. a divisor of model.tp)")
    return None


def spmd_defaults(v: VLLMConfig) -> VLLMConfig:
    """Inside a torchrun world (world size > 1) the only vLLM executor that fits is
    `external_launcher` (one vLLM rank per trainer rank, SPMD); pick it and check the layout."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return v
    if not v.distributed_executor_backend:
        v = dataclasses.replace(v, distributed_executor_backend="external_launcher")
    if v.distributed_executor_backend == "external_launcher":
        from megatron.core import parallel_state as mpu

        dp_ranks = [None] * dist.get_world_size()
        dist.all_gather_object(dp_ranks, mpu.get_data_parallel_rank())
        err = spmd_layout_error(dp_ranks, v.tensor_parallel_size)
        if err:
            raise ValueError(f"rollout.vllm: {err}")
    return v


def steering_intervention(steer_cfg):
    """(intervention, layer) from the `steering` config section: the SAE is loaded here."""
    from megatron_rl.steering.build import resolve_layer
    from megatron_rl.steering.interventions import build_intervention
    from megatron_rl.steering.sae import load_sae

    sae = load_sae(steer_cfg.sae_path, steer_cfg.sae_id)
    intervention = build_intervention(steer_cfg.mode, sae, feature_idxs=steer_cfg.feature_idxs,
                                      max_activations=steer_cfg.max_activations, strengths=steer_cfg.strengths,
                                      global_strength=steer_cfg.global_strength)
    return intervention, resolve_layer(steer_cfg, sae)


_WORKER_COMM: dict[str, object] = {}


def _join_broadcast(host, port, world, model):
    from vllm.distributed import get_tensor_model_parallel_rank

    from megatron_rl.rollout.weight_sync import PyNcclComm

    dev = next(model.parameters()).device
    _WORKER_COMM["comm"] = PyNcclComm(host, port, 1 + get_tensor_model_parallel_rank(), world, dev)
    return True


def _receive_broadcast_on_worker(model) -> int:
    from megatron_rl.rollout.weight_sync import BucketReceiver, receive_broadcast

    rx = BucketReceiver(lambda named: model.load_weights(iter(named)))
    n = receive_broadcast(_WORKER_COMM["comm"], rx.add, src=0, device=next(model.parameters()).device)
    rx.finish()
    return n


class _ThreadedBroadcast:
    """BroadcastTransport whose receivers (vLLM workers) run in a thread for the sync's duration."""

    def __init__(self, inner, llm):
        self.inner, self.llm, self._t = inner, llm, None

    def begin(self) -> None:
        self._t = threading.Thread(target=self.llm.apply_model, args=(_receive_broadcast_on_worker,))
        self._t.start()
        self.inner.begin()

    def send(self, bucket) -> None:
        self.inner.send(bucket)

    def end(self) -> None:
        self.inner.end()
        self._t.join()
