#!/usr/bin/env bash
# A short CPU search-agent run on SmolLM2-135M-Instruct: start the BM25 retriever in the
# background, wait for /health, evaluate the base model (greedy, exact match + tool-call
# rate), train, evaluate the trained checkpoint, stop the server (also on error).
# The questions carry two worked exchanges as earlier chat turns (--few-shot 2): the 135M
# model ignores the tag instruction alone, so without them no rollout earns a reward.
# Extra arguments are dotted config overrides for training and evaluation alike.
#
#   bash launch/search_agent_cpu.sh                       # defaults below, ~15-25 min on 2 cores
#   STEPS=4 bash launch/search_agent_cpu.sh rollout.n=2   # shorter
#   STEPS=4 EVAL_BEFORE=0 bash launch/search_agent_cpu.sh # reuse the base model's evaluation
#   (EVAL_FILE=...jsonl: evaluate on other questions, e.g. the first 16 of val.jsonl)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$(bash "$ROOT/launch/dev_env.sh" | tail -1)}"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore

DATA="${DATA:-data/generated/search_qa_fewshot}"
RUN="${RUN:-runs/search_agent_cpu}"
PORT="${PORT:-8000}"
STEPS="${STEPS:-8}"
EVAL_FILE="${EVAL_FILE:-$DATA/val.jsonl}"       # the questions both evaluations use

mkdir -p "$(dirname "$RUN")"
"$PY" tools/fetch_demo_model.py >/dev/null
[ -f "$DATA/train.jsonl" ] || "$PY" tools/make_search_qa_data.py --out "$DATA" --n-train 64 --n-val 32 --few-shot 2
head -n 4 "$DATA/val.jsonl" > "$DATA/val_head.jsonl"    # training's own end-of-run validation: kept short

"$PY" -m megatron_rl.cli serve-retriever --corpus "$DATA/corpus.jsonl" --port "$PORT" --topk 3 \
    > "${RUN%/}.server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { echo "retriever server died:"; cat "${RUN%/}.server.log"; exit 1; }
    sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/health" || { echo "retriever server not healthy on port $PORT"; exit 1; }
echo

COMMON=(data.train_files="[$DATA/train.jsonl]" data.max_prompt_length=384 agent.retriever_url="http://127.0.0.1:$PORT/retrieve" logging.run_dir="$RUN")
TRAIN=(trainer.total_steps="$STEPS" trainer.val_before_train=false trainer.val_every=0
       trainer.save_every=0 trainer.keep_last=1 data.train_batch_size=4 rollout.n=4
       rollout.max_new_tokens=64 agent.max_response_length=256 actor.optim.lr=1.0e-5)
EVAL=(algos.use_kl_loss=false data.val_files="[$EVAL_FILE]")

if [ "${EVAL_BEFORE:-1}" = 1 ]; then
    rm -rf "$RUN"
    mkdir -p "$RUN"
    echo "== before training"
    "$PY" -m megatron_rl.agent.evaluate --config configs/search_agent.yaml --out "$RUN/eval_before.json" \
        "${COMMON[@]}" "${TRAIN[@]}" "${EVAL[@]}" trainer.resume=none "$@"
else                        # EVAL_BEFORE=0: keep $RUN/eval_before.json of an earlier run
    rm -rf "$RUN/checkpoints" "$RUN/metrics.jsonl"
fi
echo "== training ($STEPS steps)"
"$PY" -m megatron_rl.cli train --config configs/search_agent.yaml "${COMMON[@]}" "${TRAIN[@]}" \
    data.val_files="[$DATA/val_head.jsonl]" "$@"
echo "== after training"
"$PY" -m megatron_rl.agent.evaluate --config configs/search_agent.yaml --out "$RUN/eval_after.json" \
    "${COMMON[@]}" "${TRAIN[@]}" "${EVAL[@]}" trainer.resume=auto "$@"
