#!/usr/bin/env bash
# The CPU quickstart: GRPO on SmolLM2-135M-Instruct (single-digit addition with a
# `#### <number>` answer), ~8 steps in under 10 minutes on 2 cores. Sets up .venv,
# fetches the demo model and writes the data on first use (all cached afterwards).
# Extra arguments are dotted config overrides, e.g. trainer.total_steps=4.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/launch/dev_env.sh" | tail -1)"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
"$PY" tools/fetch_demo_model.py >/dev/null
[ -f data/generated/quickstart/train.jsonl ] || "$PY" tools/make_quickstart_data.py --out data/generated/quickstart
rm -rf runs/quickstart_cpu
exec "$PY" -m megatron_rl.cli train --config configs/quickstart_cpu.yaml "$@"
