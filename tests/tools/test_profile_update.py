"""tools/profile_update.py (issue #20): kernel names land in the right category, GPU busy time
is the union of kernel intervals, the e2e batch has the e2e's real tokens, and the whole tool
runs its code paths on CPU (`--cpu-smoke`)."""
import json

import pytest

from tools.profile_update import breakdown, busy_us, category, main, make_batch, parse_variant

H200_KERNELS = {   # names as torch.profiler reports them on an H200 (torch 2.11, cuBLAS 13, Triton 3.6)
    "nvjet_tst_256x128_64x4_2x1_v_bz_coopA_NNT": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel"
    "__5x_cublas": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>": "gemm",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
    "cutlass::bfloat16_t>, true>(Flash_fwd_params)": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": "attention",
    "_fwd_partials_kernel": "loss/log-softmax",
    "_bwd_kernel": "loss/log-softmax",
    "void multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>": "optimizer",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "norm",
    "Memcpy DtoD (Device -> Device)": "copies/memcpy",
    "void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda>": "copies/memcpy",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>":
        "elementwise/activation",
    "triton_poi_fused_mul_silu_0": "elementwise/activation",
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "other",
}


@pytest.mark.parametrize("name,expected", sorted(H200_KERNELS.items()))
def test_profile_update_kernel_categories(name, expected):
    assert category(name) == expected


def test_profile_update_busy_time_is_the_union_of_kernel_intervals():
    spans = [("a", 0.0, 10e3), ("b", 5e3, 15e3), ("c", 20e3, 30e3), ("a", 21e3, 22e3)]    # microseconds
    assert busy_us(spans) == 25e3                        # 0..15 and 20..30 ms; overlaps count once
    b = breakdown(spans)
    assert b["kernel_ms"] == 31.0                        # kernel time itself sums every kernel
    assert (b["top"][0]["kernel"], b["top"][0]["ms"], b["top"][0]["calls"], b["top"][0]["pct"]) == ("a", 11.0, 2, 35.5)


def test_profile_update_variants_parse_and_refuse_by_name():
    assert (parse_variant("padded", False).micro_batch_size, parse_variant("packed", False).max_tokens_per_microbatch) \
        == (32, 20480)
    assert parse_variant("packed-40960", False).max_tokens_per_microbatch == 40960
    assert parse_variant("padded-16", False).micro_batch_size == 16
    with pytest.raises(SystemExit, match="'dense'"):
        parse_variant("dense", False)
    v = parse_variant("padded-64+unfusedrope", False)
    assert (v.micro_batch_size, v.unfused_rope, parse_variant("packed", False).unfused_rope) == (64, True, False)
    with pytest.raises(SystemExit, match="unfusedrope"):
        parse_variant("padded+fast", False)
    assert parse_variant("logprob", False).forward_only and not parse_variant("packed", False).forward_only
    assert parse_variant("logprob-40960", False).max_tokens_per_microbatch == 40960


def test_profile_update_batch_is_the_e2e_workload():
    batch, work = make_batch(512, 8, 256, 49152, (20, 24))
    pm = batch["prompt_mask"]
    assert pm.shape == (512, 24) and bool(pm[:, -1].all())            # left padding: prompts end at the boundary
    assert work.tokens == int(pm.sum()) + 512 * 256
    assert 512 * 276 <= work.tokens <= 512 * 280                        # ~142k real tokens
    assert bool((pm.sum(1).view(64, 8) == pm.sum(1).view(64, 8)[:, :1]).all())   # one prompt per group of 8


def test_profile_update_cpu_smoke_runs_every_code_path(tmp_path):
    out = tmp_path / "uprof.json"
    results = main(["--cpu-smoke", "--variants", "packed,padded-8,logprob", "--json", str(out)])
    assert [r.error for r in results] == [None, None, None]
    packed, padded, logprob = results
    assert logprob.microbatches == packed.microbatches and 0 < logprob.update_s   # the forward-only pass
    assert padded.microbatches == 2 and packed.microbatches >= 336 // 64   # 16 rows / 8; 336 tokens / 64
    for r in results:
        assert 0 < r.busy_s <= r.profiled_wall_s and r.update_s > 0 and r.real_tokens == 336
        assert sum(c["pct"] for c in r.profile["categories"]) == pytest.approx(100.0, abs=0.5)
    assert [v["label"] for v in json.loads(out.read_text())["variants"]] == [
        "tiny/sdpa/packed", "tiny/sdpa/padded-8", "tiny/sdpa/logprob"]


def test_profile_update_a_failed_profile_keeps_the_timings_in_the_tables():
    from tools.profile_update import Result, summary, table

    r = Result("packed", 32, 20480, microbatches=7, real_tokens=142336, update_s=3.3, tflops=440.0,
               gemm_shape=(20480, 2048, 49152), gemm_peak_tflops=700.0, pct_gemm_peak=62.9,
               profile_error="RuntimeError: CUPTI unavailable")
    assert "3.300 s" in table(r, 720.0) and "profiler failed: RuntimeError" in table(r, 720.0)
    assert summary([r]).splitlines()[-1].startswith("| packed | 3.300 | 440.0 | 62.9 |")
