#!/usr/bin/env bash
# Eva's step on one GPU, in one run of about 9 minutes (an H200, 16 CPU cores):
#
#   1. environment: nvidia-smi, JAX's devices, the versions;
#   2. op counts: every workload of benchmarks/step_time.py (the three small ones,
#      resnet18, resnet18-b512, gpt and their -bf16 variants) x every optimizer (sgd, adamw,
#      eva, eva-f, eva-s, kfac, shampoo, muon), compiled and counted (`--ops-only`) in
#      parallel processes; their compile times (under that parallel load) and op counts on
#      the GPU backend;
#   3. step time: the same steps timed one workload at a time (`--ops`), the compiled
#      programs read back from JAX's persistent compilation cache that step 2 filled
#      (so step 3's "compile s" is the cache's load time; step 2 has the compile times);
#      the ResNet-18 run also profiles SGD's and Eva's steps (`--profile`: device time per
#      step by kind of operation and the top operations);
#   4. the tables of steps 2 and 3 merged into ops.md / time.md (`--merge`).
#
# Every part runs under `timeout`, within one budget (BUDGET_S, default 540 s): a slow part
# is cut, the others still run, and what finished is written. Results, logs and the
# profile traces go to $OUT if set, else benchmarks/results/gpu/<UTC date> (a dry run:
# ${TMPDIR:-/tmp}/eva_optax_gpu_sh_dry_run).
#
#   bash benchmarks/gpu.sh              # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run    # the same commands with tiny settings on the CPU
#                                       # (GPU_SH_DRY_RUN=1 does the same), ~2 minutes
#
# Expects jax with CUDA in .venv (or $PYTHON); if JAX sees no GPU it tries
# `pip install "jax[cuda12]"` once and stops with an error if that fails (no internet).

set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=${GPU_SH_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "$DRY" = 1 ]; then
  DEST=${OUT:-${TMPDIR:-/tmp}/eva_optax_gpu_sh_dry_run}
else
  DEST=${OUT:-benchmarks/results/gpu/$(date -u +%Y-%m-%d)}
fi
mkdir -p "$DEST/ops" "$DEST/time" "$DEST/profile"
exec > >(tee -a "$DEST/log.txt") 2>&1

STEP_TIME="$PY -m benchmarks.step_time"
if [ "$DRY" = 1 ]; then
  BUDGET=${BUDGET_S:-150}
  TINY=--tiny
  OPTS=sgd,eva,kfac,muon
  SMALL="autoencoder"
  RESNETS="resnet18"
  GPTS="gpt-bf16"
  GPT_GROUPS="kfac eva,muon"      # each job also compiles sgd, the reference
  TIMED="resnet18 gpt-bf16 autoencoder"
  JOBS=2
  OPS_PHASE_S=80                   # the op-count phase ends by then
  ROUNDS_SMALL="--rounds 1 --steps-per-round 1 --warmup 0"
  ROUNDS_BIG="--rounds 1 --steps-per-round 1 --warmup 0"
  PROFILE_STEPS=2
  LIMIT_SMALL=40; LIMIT_RESNET=60; LIMIT_GPT=60
else
  BUDGET=${BUDGET_S:-540}
  TINY=
  OPTS=sgd,adamw,eva,eva-f,eva-s,kfac,shampoo,muon
  SMALL="autoencoder resnet transformer"
  RESNETS="resnet18 resnet18-bf16 resnet18-b512 resnet18-b512-bf16"
  GPTS="gpt gpt-bf16"
  GPT_GROUPS="kfac shampoo eva-s,muon eva,eva-f,adamw"
  # part 3's order: what matters most first (what the budget leaves out comes last)
  TIMED="resnet18 gpt resnet18-bf16 gpt-bf16 resnet18-b512 resnet18-b512-bf16 $SMALL"
  JOBS=8
  OPS_PHASE_S=300
  ROUNDS_SMALL="--rounds 6 --steps-per-round 3 --warmup 2"
  ROUNDS_BIG="--rounds 3 --steps-per-round 3 --warmup 1"
  PROFILE_STEPS=10
  LIMIT_SMALL=35; LIMIT_RESNET=50; LIMIT_GPT=70
fi
RESERVE=15  # seconds kept for the merged tables at the end
START=$SECONDS

# shellcheck source=benchmarks/gpu_lib.sh
source benchmarks/gpu_lib.sh

# ---------------------------------------------------------------------------
gpu_environment "$DEST"

# Every process of parts 2 and 3 shares one persistent compilation cache, new for this
# run (so that part 2's compile times are compile times): part 2 compiles, part 3 loads
# the same programs. Removed at the end unless given as JAX_COMPILATION_CACHE_DIR.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/eva_optax_gpu_sh_cache.XXXXXX")
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
echo "compilation cache: $JAX_COMPILATION_CACHE_DIR"

# ---------------------------------------------------------------------------
# 2. Op counts, in parallel (each process allocates GPU memory as it needs it).
(( OPS_PHASE_S > BUDGET - RESERVE )) && OPS_PHASE_S=$(( BUDGET - RESERVE ))
ops_deadline=$(( START + OPS_PHASE_S ))
echo "== op counts: $JOBS processes at a time, until $OPS_PHASE_S s ($(date -u +%T))"
{
  for w in $GPTS; do
    for group in $GPT_GROUPS; do echo "$w-${group//,/-} $w sgd,$group"; done
  done
  for w in $RESNETS $SMALL; do echo "$w $w $OPTS"; done
} > "$DEST/ops/jobs.txt"
pids=()
running() {  # how many of the op-count processes are still running
  local n=0 pid
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && n=$(( n + 1 )); done
  echo "$n"
}
while read -r tag workload optimizers; do
  while (( $(running) >= JOBS )); do sleep 1; done
  limit=$(( ops_deadline - SECONDS ))
  if (( limit < 5 )); then
    echo "  $tag: not started, the op-count phase is over"
    continue
  fi
  (
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout --kill-after=5 "$limit" \
      $STEP_TIME --ops-only $TINY --workloads "$workload" --optimizers "$optimizers" \
      --json "$DEST/ops/$tag.json" --md "$DEST/ops/$tag.md" > "$DEST/ops/$tag.log" 2>&1
    echo "  $tag: exit $? after $(( SECONDS - START ))s of the run"
  ) &
  pids+=($!)
done < "$DEST/ops/jobs.txt"
for pid in "${pids[@]}"; do wait "$pid"; done  # (a bare `wait` would also wait for tee)

# ---------------------------------------------------------------------------
# 3. Step time, one workload at a time; the ResNet-18 run profiles SGD and Eva.

# compiled WORKLOAD: the optimizers of $OPTS whose step part 2 compiled (so the cache has
# it: a step that did not compile there would not compile within part 3's limit either);
# sgd,eva if part 2 has none.
compiled() {
  "$PY" - "$1" "$OPTS" "$DEST"/ops/*.json <<'EOF'
import json, sys
workload, wanted, done = sys.argv[1], sys.argv[2].split(","), set()
for path in sys.argv[3:]:
    try:
        with open(path) as f:
            done |= set(json.load(f)["results"].get(workload, {}).get("variants", {}))
    except (OSError, ValueError):
        pass
print(",".join(o for o in wanted if o in done) if "sgd" in done else "sgd,eva")
EOF
}

for w in $TIMED; do
  case "$w" in
    resnet18) limit=$LIMIT_RESNET; rounds=$ROUNDS_BIG
      extra="--profile $DEST/profile --profile-optimizers sgd,eva --profile-steps $PROFILE_STEPS" ;;
    resnet18*) limit=$LIMIT_RESNET; rounds=$ROUNDS_BIG; extra= ;;
    gpt*) limit=$LIMIT_GPT; rounds=$ROUNDS_BIG; extra= ;;
    *) limit=$LIMIT_SMALL; rounds=$ROUNDS_SMALL; extra= ;;
  esac
  optimizers=$(compiled "$w")
  echo "-- $w: $optimizers"
  # shellcheck disable=SC2086
  part "step time $w" "$limit" $STEP_TIME --ops $TINY --workloads "$w" --optimizers "$optimizers" \
    $rounds $extra --json "$DEST/time/$w.json" --md "$DEST/time/$w.md"
done

# ---------------------------------------------------------------------------
# 4. The merged tables.
RESERVE=0
shopt -s nullglob
ops_json=("$DEST"/ops/*.json)
time_json=("$DEST"/time/*.json)
if (( ${#ops_json[@]} )); then
  part "op counts, merged" 10 $STEP_TIME --merge "${ops_json[@]}" \
    --json "$DEST/ops.json" --md "$DEST/ops.md"
fi
if (( ${#time_json[@]} )); then
  part "step time, merged" 10 $STEP_TIME --merge "${time_json[@]}" \
    --json "$DEST/time.json" --md "$DEST/time.md"
fi
echo "== done in $(( SECONDS - START ))s; results in $DEST"
