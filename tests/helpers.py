"""Shared test helpers: tiny random HF checkpoints and multi-process launching."""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp

TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                  intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu")


def make_tiny_hf(out_dir, family: str = "llama", tie: bool = True, seed: int = 0, **overrides) -> str:
    """Save a random tiny HF causal LM (llama, qwen2, qwen3, qwen3_moe, mixtral, deepseek_v3) as an HF directory."""
    import transformers

    cfg = dict(TINY_LLAMA, tie_word_embeddings=tie)
    if family == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", **overrides)
        config = transformers.Qwen2Config(**cfg)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":     # head_dim 24 != hidden/heads: kv_channels is really tested
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=24, **overrides)
        config = transformers.Qwen3Config(**cfg)
        cls = transformers.Qwen3ForCausalLM
    elif family == "qwen3_moe":  # 4 experts, top-2, layer 1 dense (mlp_only_layers)
        cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=24, num_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1])
        cfg.update(overrides)
        config = transformers.Qwen3MoeConfig(**cfg)
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "mixtral":
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                   num_experts_per_tok=2, intermediate_size=48, **overrides)
        config = transformers.MixtralConfig(**cfg)
        cls = transformers.MixtralForCausalLM
    elif family == "deepseek_v3":  # MLA, layer 0 dense, 8 experts in 2 groups, top-4, 1 shared expert
        cfg.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", num_hidden_layers=3,
                   num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                   num_experts_per_tok=4, n_group=2, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                   first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=12, norm_topk_prob=True)
        cfg.update(overrides)
        config = transformers.DeepseekV3Config(**cfg)
        cls = transformers.DeepseekV3ForCausalLM
    else:
        cfg.update(overrides)
        config = transformers.LlamaConfig(**cfg)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():   # non-trivial norms and biases so the mapping is really tested
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
        for n, b in model.named_buffers():  # DeepSeek-V3's aux-free routing bias: make it steer routing
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    model.save_pretrained(out_dir, safe_serialization=True)
    return str(out_dir)


def _worker(rank, world, port, fn, args, errq):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)
    except Exception:
        errq.put((rank, traceback.format_exc()))
        raise
    _leave_process_group()


def _leave_process_group(timeout_s: float = 60.0) -> None:
    """A worker whose `fn` left the default group up tears it down so that rank 0, which hosts
    the TCPStore, goes last: a store host exiting first makes a peer's gloo teardown throw in a
    C++ thread ("terminate called without an active exception", exit -6, seen in CI)."""
    import time

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    if not dist.is_initialized():
        return
    store, rank, size = _get_default_store(), dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    if rank != 0:
        store.add("test_workers_left", 1)
        return
    deadline = time.monotonic() + timeout_s
    while store.add("test_workers_left", 0) < size - 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def run_multiproc(fn, world: int = 2, args: tuple = ()) -> None:
    """Run `fn(rank, world, *args)` in `world` spawned processes (gloo via env://)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, errq)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    if not errq.empty():
        rank, tb = errq.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"worker exit codes {bad}")


def write_word_tokenizer(out_dir, words) -> None:
    """Save an offline word-level tokenizer (ChatML-like template) for `words` into out_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    hf.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    hf.save_pretrained(out_dir)


def convert_round_trip(hf_dir, tmp_path, **parallel) -> tuple[dict, dict]:
    """hf-to-mcore at `parallel` (tp=/pp=/ep=, in gloo processes), mcore-to-hf here; returns
    (the checkpoint's tensors, the exported ones) for a bit-exactness check."""
    from pathlib import Path

    from safetensors.torch import load_file

    from checkpoints_conversion.convert import hf_to_mcore, mcore_to_hf
    from megatron_rl.parallel import destroy_distributed

    tmp_path = Path(tmp_path)
    hf_to_mcore(hf_dir, tmp_path / "mc", **parallel)
    try:
        mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    finally:
        destroy_distributed()
    ref, got = load_file(f"{hf_dir}/model.safetensors"), {}
    for f in (tmp_path / "back").glob("*.safetensors"):
        got.update(load_file(f))
    return ref, got


def assert_tensors_bit_exact(ref: dict, got: dict) -> None:
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


def fit_trainer(overrides: list[str]):
    """`build_trainer` + `fit()` on config overrides, closing the logger and reward workers."""
    from megatron_rl.config import load_experiment_config
    from megatron_rl.trainer.main import build_trainer

    trainer = build_trainer(load_experiment_config(None, overrides))
    try:
        trainer.fit()
    finally:
        trainer.logger.close()
        trainer.rewards.close()
    return trainer
