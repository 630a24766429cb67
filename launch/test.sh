#!/usr/bin/env bash
# The test suite (CPU): sets up .venv if needed, then runs pytest.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m slow` for real-model tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/launch/dev_env.sh" | tail -1)"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
