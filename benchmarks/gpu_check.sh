#!/usr/bin/env bash
# The GPU check as ONE prepared command for a lent H100/H200 (the device tool runs it in a copy of the working tree;
# results land in $OUT):
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=580)
#
# The default stage, gpu, is benchmarks/gpu.py: our GRPO and CAPO learner steps, the full-network masks, the trust
# region and our sampler beside HF transformers (fwd+bwd, generate) at the Qwen2.5-0.5B and 1.5B shapes, with MFU;
# it stops starting measurements after its own time guard (--budget-s). The per-benchmark stages of issues 3 and 4
# (learner_8x1024, learner_96x1024, sampler) run when named in STAGES (they do not fit one call together with gpu):
#
#   run(command="STAGES='learner_8x1024 learner_96x1024 sampler' bash benchmarks/gpu_check.sh", timeout_s=590)
#
# It needs no install: the device image's python3 has jax[cuda], flax, optax, chex, torch and transformers, and
# capo_jax is imported from the tree (PYTHONPATH). Each stage has its own time limit so that one slow compile cannot
# eat the others' time; every stage's output is kept in $OUT/<stage>.txt whatever happens. Dry run here on CPU:
#
#   SIZE=tiny SAMPLER_SIZE=tiny OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"
SIZE="${SIZE:-qwen2-0.5b}"
SAMPLER_SIZE="${SAMPLER_SIZE:-qwen2-0.5b}"
PY="${PY:-python3}"
STAGES="${STAGES:-gpu}"
if [ "$SIZE" = tiny ]; then GPU_SIZE="${GPU_SIZE:-tiny}"; else GPU_SIZE="${GPU_SIZE:-gpu}"; fi
mkdir -p "$OUT"

stage() {  # stage NAME SECONDS CMD...: run CMD with a time limit, output to the console and $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" >"$OUT/$name.txt"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 12 "$OUT/$name.txt"
  echo "== $name rc=$rc wall=$((SECONDS - start))s" | tee -a "$OUT/$name.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

want() { [[ " $STAGES " == *" $1 "* ]]; }

# benchmarks/gpu.py: everything below in one process, both shapes, against HF on the same GPU (prints a table, then
# key=value lines: *_over_hf_*, capo_over_grpo_*, mfu_*, *tokens_per_s_*).
want gpu && stage gpu 530 "$PY" -m benchmarks.gpu --size "$GPU_SIZE"
# Issue 4: GRPO vs every curvature mode at B = 8 × 1024 (prints capo_over_grpo= last), then CAPO and the trust
# region at 96 × 1024 as 12 micro-batches (the paper's 12 prompts × 8 completions per step).
want learner_8x1024 && stage learner_8x1024 240 "$PY" -m benchmarks.learner_step --size "$SIZE"
want learner_96x1024 && stage learner_96x1024 150 "$PY" -m benchmarks.learner_step --size "$SIZE" \
  --micro-batches 12 --methods capo-last-layer,trust-region --repeats 3 --steps 2
# Issue 3: the jitted KV-cache sampler against HF generate on the same architecture (prints sampler_tokens_per_s=).
want sampler && stage sampler 150 "$PY" -m benchmarks.sampler --size "$SAMPLER_SIZE"
grep -hE "_over_|mfu_|tokens_per_s|skipped|failed:" "$OUT"/*.txt | tee "$OUT/summary.txt"
