#!/usr/bin/env bash
# One device call = one or more stages of the GPU checks, each logged to $OUT/<stage>.log.
#
#   bash tools/gpu_session.sh STAGE [STAGE ...]
#
# Stages: memory (planner vs measured peaks, 1 GPU) | memory2 (2 GPUs) | multi (TP=2/PP=2 step
# parity + fused loss TP=2, 2 GPUs) | fusedtp (fused vs naive loss
# time/memory at TP=2) | gad (GAD step by phase) | vgr (attention recompute cost) | vlvgr (VGR over the vision span, Qwen2.5-VL-3B-shaped, 1 GPU) | fp8 (update step sdpa/te bf16 vs te fp8, log-prob gap; needs TE) |
# offload (ref.offload + trainable-state offload/onload, 1 GPU) | trainer (GRPO recipe smoke, ref.offload off/on, 1 GPU) | rm (reward-model pass, 1 GPU) | rmstep (GRPO steps with a reward-model reward, 1 GPU) | rmstep (GRPO steps with a reward-model reward, 1 GPU) | moe (Qwen3-30B-A3B-shaped slice update, 1 GPU) | moete (grouped-GEMM MoE on the TE spec: tiny Qwen3-MoE parity/export + the slice te vs sdpa, 1 GPU, TE 2.11) | resume (distributed-optimizer elastic resume DP=2 -> DP=1, 2 GPUs) | vllm (vLLM engine, weight sync, steering; needs the bundle) | vgraph (vLLM CUDA-graph steering) | vllmvl (vLLM rollouts on image prompts through the Trainer, 1 GPU; VLLMVL_RUNS picks runs) | vspmd (2 GPUs: SPMD vLLM TP=2 next to a TP=2 actor) | vdp (4 GPUs: Trainer DP=2 x TP=2 with vLLM) | vpart (stash the carried
# vLLM bundle part in /tmp/vparts) | vmoe (vLLM on a Qwen3-30B-A3B-shaped slice: MoE weight sync GB/s, routing replay
# with vLLM's routed experts; needs the bundle) | scale (issue #12: 70B-shaped slice at TP=N and TP=N/2 x PP=2) | vunpack (join and unpack the parts into /tmp/vsite) | e2e (tools/bench_e2e.py, E2E_ARGS; stage with tools/gpu_stage.sh) | uprof (issue #20: the e2e update profiled by kernel category, padded vs packed, 1 GPU; UPROF_VARIANTS, UPROF_MODELS, UPROF_SPECS, UPROF_TIMEOUT, UPROF_TRACE=1 keeps the chrome traces).
#
# The GPU machines lack megatron-core: carry `.whl` (the cp312 wheel). vLLM comes as
# parts of an xz tarball (../shared/gpu-wheels/build_vllm_bundle.sh, re-split at 50 MB
# into .vllm_bundle/p0..p3), one part per call while the machine stays warm.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_DEVICE_MAX_CONNECTIONS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
if [ -d .whl ] && [ ! -f /tmp/site/.mrl_ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.mrl_ok
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
R1="python3 -m torch.distributed.run --standalone --nproc-per-node 1"
R2="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
SMOL=.cache/demo/SmolLM2-135M-Instruct

stage_memory() {
  for c in "--hf-config llama-1b --seq 4096 --num-microbatches 2" \
           "--hf-config smollm2-135m --seq 8192 --micro-batch 2 --num-microbatches 2"; do
    echo "== measure_peak_memory $c"
    timeout 180 $R1 tools/measure_peak_memory.py $c 2>&1 | grep --line-buffered -v -i warn | tail -8
  done
}

stage_memory2() {
  for c in "--hf-config llama3-8b --tp 2 --seq 4096 --num-microbatches 4 --recompute selective" \
           "--hf-config llama-1b --pp 2 --seq 4096 --num-microbatches 4"; do
    echo "== measure_peak_memory $c"
    timeout 200 $R2 tools/measure_peak_memory.py $c 2>&1 | grep --line-buffered -v -i warn | tail -8
  done
}

stage_multi() { timeout 300 $R2 tools/gpu_multi_check.py --hang-timeout 240 --json "$OUT/multi.json" 2>&1 | grep --line-buffered -v -i warn; }
stage_fusedtp() { timeout 150 $R2 tools/bench_fused_loss_tp.py --tokens 32768 --vocab 128256 2>&1 | grep --line-buffered -v -i warn; }
stage_scale() {   # issue #12 on however many GPUs are here (8 for the real run)
  local n; n=$(nvidia-smi -L | grep -c '^GPU'); local h=$((n / 2))
  local RN="python3 -m torch.distributed.run --standalone --nproc-per-node $n"
  for c in "--tp $n" "--tp $h --pp 2"; do
    echo "== 70B-shaped 4 layers, $c: step time, peak memory vs planner"
    timeout 200 $RN tools/measure_peak_memory.py --hf-config configs/shapes/llama3_70b_4layers.json $c \
      --seq 4096 --num-microbatches 4 --json "$OUT/scale_mem_${c// /}.json" 2>&1 | grep --line-buffered -v -i warn | tail -14
    echo "== weight sync $c"
    timeout 200 $RN tools/gpu_scale_check.py $c --json "$OUT/scale_sync_${c// /}.json" 2>&1 | grep --line-buffered "^|\|weight sync\|Error"
  done
  echo "== fused loss TP=$n"
  timeout 150 $RN tools/bench_fused_loss_tp.py --tokens 32768 --vocab 128256 2>&1 | grep --line-buffered -v -i warn | tail -6
}

stage_offload() {  # models/offload.py on a ~1B bf16 model: ref.offload, actor grads/optimizer/weights round trip
  timeout 240 python3 tools/bench_offload.py 2>&1 | grep --line-buffered -v -i warn
  if python3 -c "import pytest" 2>/dev/null; then   # the bf16 (fp32 master params) round trip runs on CUDA only
    timeout 120 python3 -m pytest -q -p no:warnings -p no:cacheprovider tests/trainer/test_offload.py 2>&1 | tail -4
  fi
}
stage_trainer() { timeout 400 python3 tools/gpu_trainer_smoke.py 2>&1 | grep --line-buffered -v -i warn | tail -20; }
stage_rm() { timeout 300 python3 tools/bench_reward_model.py 2>&1 | grep --line-buffered -v -i warn | tail -12; }
stage_rmstep() { timeout 300 python3 tools/gpu_reward_model_step.py 2>&1 | grep --line-buffered "^|\|Error\|error"; }
stage_moe() { timeout 400 python3 tools/bench_moe_slice.py 2>&1 | grep --line-buffered -v -i warn | tail -10; }
stage_moete() { timeout -k 10 295 python3 tools/gpu_moe_te_check.py --json "$OUT/moete.json" 2>&1 | grep --line-buffered -v -i "warn\|it/s\]"; }   # needs TE in /tmp/site; (b)'s subprocesses time out at 150 s each
stage_resume() { timeout 200 $R2 tools/gpu_resume_check.py save 2>&1 | grep --line-buffered -v -i warn | tail -4; timeout 200 $R1 tools/gpu_resume_check.py resume 2>&1 | grep --line-buffered -v -i warn | tail -8; }
stage_gad() { timeout 300 python3 tools/bench_gad_step.py --model-src "$SMOL" --steps 1 --warmup 1 --max-new-tokens 128 2>&1 | grep --line-buffered -v -i warn; }
stage_fp8() { timeout 330 python3 tools/bench_fp8.py --json "$OUT/fp8.json" 2>&1 | grep --line-buffered -v -i warn; }   # sdpa/te bf16 vs te fp8 (needs TE)
stage_uprof() { timeout -k 10 "${UPROF_TIMEOUT:-280}" python3 tools/profile_update.py ${UPROF_VARIANTS:+--variants "$UPROF_VARIANTS"} ${UPROF_MODELS:+--models "$UPROF_MODELS"} ${UPROF_SPECS:+--specs "$UPROF_SPECS"} --json "$OUT/uprof.json" ${UPROF_TRACE:+--trace-dir "$OUT"} 2>&1 | grep --line-buffered -v -i "warn\|USDT"; }   # issue #20: where the e2e update's time goes (1 GPU)
stage_vgr() { timeout 240 python3 tools/bench_vgr.py --reps 2 2>&1 | grep --line-buffered -v -i warn; }
stage_vlvgr() { timeout 240 python3 tools/bench_vl_vgr.py --reps 2 2>&1 | grep --line-buffered -v -i "warn\|Unknown MLP"; }

stage_vpart() {
  mkdir -p /tmp/vparts
  for p in .vllm_bundle/p*; do [ -f "$p" ] && cp "$p" /tmp/vparts/ && echo "stashed $p"; done
  ls -la /tmp/vparts
}

stage_vunpack() {
  cat /tmp/vparts/p* > /tmp/v.tar.xz && sha256sum /tmp/v.tar.xz && mkdir -p /tmp/vsite \
    && tar -xJf /tmp/v.tar.xz -C /tmp/vsite && rm /tmp/v.tar.xz && echo "vLLM unpacked into /tmp/vsite"
}

stage_vllm() {
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  PYTHONPATH="/tmp/vsite:$PYTHONPATH" timeout 560 python3 tools/gpu_vllm.py --model-config "$SMOL" \
    ${VLLM_SECTIONS:+--sections "$VLLM_SECTIONS"} 2>&1 \
    | grep --line-buffered -v -i warn
}

stage_vspmd() {   # 2 GPUs: TP=2 Megatron actor + SPMD vLLM TP=2 (external_launcher) in the same ranks
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  for mode in ${VSPMD_MODES:-layout grpo}; do
    PYTHONPATH="/tmp/vsite:$PYTHONPATH" timeout 300 $R2 tools/gpu_vllm_spmd.py --model-config "$SMOL" --mode $mode \
      2>&1 | grep --line-buffered -v -i "warn\|Capturing CUDA\|Unknown MLP"
  done
}

stage_vdp() {     # all GPUs: Trainer GRPO at DP = n/2 x TP=2 with one vLLM TP=2 group per DP rank (4 GPUs)
  local n; n=$(nvidia-smi -L | grep -c '^GPU')
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  PYTHONPATH="/tmp/vsite:$PYTHONPATH" timeout 400 python3 -m torch.distributed.run --standalone --nproc-per-node $n \
    tools/gpu_vllm_spmd.py --model-config "$SMOL" --mode grpo --tp 2 2>&1 \
    | grep --line-buffered -v -i "warn\|Capturing CUDA\|Unknown MLP"
}

stage_vllmvl() {   # issue #25: Trainer GRPO on image prompts with vLLM (frozen / trained tower, native reference, 3B-shaped)
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  PYTHONPATH="/tmp/vsite:$PYTHONPATH" timeout 590 python3 tools/gpu_vllm_vl.py ${VLLMVL_RUNS:+--runs "$VLLMVL_RUNS"} 2>&1 \
    | grep --line-buffered -v -i "warn\|Capturing CUDA\|Unknown MLP\|it/s\]"
}

stage_e2e() {      # issue #20: tools/bench_e2e.py all, parts and variants from E2E_ARGS; results kept in /tmp/e2e
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  PYTHONPATH="/tmp/vsite:$PYTHONPATH" timeout -k 10 "${E2E_TIMEOUT:-580}" python3 tools/bench_e2e.py all --dir /tmp/e2e \
    --tokenizer "${E2E_TOKENIZER:-/tmp/tok}" ${E2E_ARGS:-} 2>&1 | grep --line-buffered -v -i "warn\|it/s\]\|Capturing CUDA"
  cp /tmp/e2e/*.json "$OUT/" 2>/dev/null; ls /tmp/e2e
}

stage_vgraph() {   # vLLM with torch.compile + CUDA graphs, plain vs steered architecture (own process)
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  PYTHONPATH="/tmp/vsite:$PYTHONPATH" timeout 400 python3 tools/gpu_vllm.py --model-config "$SMOL" --sections graph \
    2>&1 | grep --line-buffered -v -i warn
}

stage_vmoe() {     # issue #19: MoE weight sync into vLLM's fused-MoE layers + enable_return_routed_experts (1 GPU)
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  PYTHONPATH="/tmp/vsite:$PYTHONPATH" timeout -k 10 295 python3 tools/gpu_vllm_moe.py --layers "${VMOE_LAYERS:-2}" 2>&1 \
    | grep --line-buffered -v -i warn
}

for s in "$@"; do
  echo "######## stage $s ($(date +%H:%M:%S))"
  "stage_$s" 2>&1 | tee "$OUT/$s.log"
done
