#!/usr/bin/env bash
# Stage the GPU stack on a lent machine without network, one carried part per device call
# (docs/gpu_staging.md). Idempotent: each call stashes whatever staged parts this call carried
# (.whl, .gl/trl, .gl/tok, .gl/vllm/part*, .gl/te/core*, .gl/te/small) in /tmp/stage, then
# installs every bundle whose parts are all there and that is not installed yet:
#   megatron-core + TRL wheels -> /tmp/site, vLLM -> /tmp/vsite, TE -> /tmp/site, tokenizer -> /tmp/tok.
#
#   bash tools/gpu_stage.sh            # then: export PYTHONPATH=/tmp/site:/tmp/vsite:$PWD
set -uo pipefail
S=/tmp/stage
mkdir -p $S/vllm $S/te/small $S/wheels /tmp/site /tmp/vsite /tmp/tok
for p in .gl/vllm/part*; do [ -f "$p" ] && cp "$p" $S/vllm/ && echo "stashed $p"; done
for p in .gl/te/core*; do [ -f "$p" ] && cp "$p" $S/te/ && echo "stashed $p"; done
[ -d .gl/te/small ] && cp .gl/te/small/*.whl $S/te/small/ && echo "stashed .gl/te/small"
[ -d .whl ] && cp .whl/*.whl $S/wheels/ && echo "stashed .whl"
[ -d .gl/trl ] && cp .gl/trl/*.whl $S/wheels/ && echo "stashed .gl/trl"
[ -d .gl/tok ] && cp .gl/tok/* /tmp/tok/ && echo "stashed .gl/tok -> /tmp/tok"

pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
if ls $S/wheels/*.whl >/dev/null 2>&1; then
  for w in $S/wheels/*.whl; do
    [ -f "$w.done" ] || { pipi "$w" && touch "$w.done" && echo "installed $(basename "$w")"; }
  done
fi
if [ "$(ls $S/vllm/part* 2>/dev/null | wc -l)" -ge 4 ] && [ ! -f /tmp/vsite/.ok ]; then
  cat $S/vllm/part* | xz -d | tar -x -C /tmp/vsite && touch /tmp/vsite/.ok && rm -f $S/vllm/part* \
    && echo "vLLM unpacked into /tmp/vsite"
fi
if [ "$(ls $S/te/core* 2>/dev/null | wc -l)" -ge 3 ] && ls $S/te/small/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.te_ok ]; then
  te=/tmp/transformer_engine_cu13-2.11.0-py3-none-manylinux_2_28_x86_64.whl
  cat $S/te/core* > $te && pipi $te $S/te/small/*.whl && touch /tmp/site/.te_ok && rm -f $S/te/core* $te \
    && echo "Transformer Engine installed into /tmp/site"
fi
echo "status: vllm parts $(ls $S/vllm 2>/dev/null | wc -l)/4 unpacked=$([ -f /tmp/vsite/.ok ] && echo y || echo n);" \
  "te cores $(ls $S/te/core* 2>/dev/null | wc -l)/3 installed=$([ -f /tmp/site/.te_ok ] && echo y || echo n);" \
  "wheels $(ls $S/wheels/*.done 2>/dev/null | wc -l); free disk $(df -h /tmp | tail -1 | awk '{print $4}')"
