#!/usr/bin/env bash
# Single-node training on any number of GPUs (NCCL), or on CPU processes (gloo).
#
#   bash launch/torchrun.sh [--nproc N] [--cpu] -- --config FILE [section.key=value ...]
#
# Everything after `--` goes unchanged to `megatron-rl train`. N defaults to the GPUs
# visible here (1 on CPU). `--cpu`, or no GPU, hides the GPUs and runs N gloo processes.
# DRY_RUN=1 prints the command instead of running it. Uses .venv/bin/python if present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NPROC="" CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc|--nproc-per-node) NPROC="$2"; shift 2 ;;
    --nproc=*|--nproc-per-node=*) NPROC="${1#*=}"; shift ;;
    --cpu) CPU=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) break ;;   # no `--`: the rest are train arguments
  esac
done
if [ $# -eq 0 ]; then
  echo "launch/torchrun.sh: missing train arguments, e.g. -- --config configs/quickstart_cpu.yaml" >&2
  exit 2
fi

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"

NGPU=0
if [ "$CPU" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  NGPU="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    NGPU="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)"
  fi
fi
if [ "$NGPU" -gt 0 ]; then
  NPROC="${NPROC:-$NGPU}"
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"    # Megatron TP/SP overlap ordering
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a hung collective kills the job
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
else
  NPROC="${NPROC:-1}"
  export CUDA_VISIBLE_DEVICES=""          # gloo everywhere, even where a GPU exists (--cpu)
fi
CORES="$(nproc 2>/dev/null || echo 1)"
THREADS=$(( CORES / NPROC )); [ "$THREADS" -ge 1 ] || THREADS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CMD=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_rl.cli train "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf 'OMP_NUM_THREADS=%s CUDA_VISIBLE_DEVICES=%q\n' "$OMP_NUM_THREADS" "${CUDA_VISIBLE_DEVICES-<all>}"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
cd "$ROOT"
exec "${CMD[@]}"
