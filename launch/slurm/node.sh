#!/usr/bin/env bash
# One node's part of a multi-node run: torchrun with c10d rendezvous at $MASTER_ADDR.
# Started by train.sbatch through `srun` (one task per node); reads the allocation from
# the environment (SLURM_NODEID, NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT,
# RDZV_ID, LOG_DIR, PY, ROOT). Arguments go unchanged to `megatron-rl train`.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
NODE_RANK="${SLURM_NODEID:?SLURM_NODEID is not set (run through srun)}"
NODE_LOG_DIR="$LOG_DIR/node$NODE_RANK"
CMD=("$PY" -m torch.distributed.run
     --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
     --max-restarts 0 --log-dir "$NODE_LOG_DIR" --redirects 3 --tee 3
     -m megatron_rl.cli train "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '[node %s %s] ' "$NODE_RANK" "${SLURMD_NODENAME:-$(hostname)}"; printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
mkdir -p "$NODE_LOG_DIR"
cd "$ROOT"
exec "${CMD[@]}"
