#!/usr/bin/env bash
# Time to quality on one GPU, in one run of about 9 minutes (an H200):
#
#   1. environment: nvidia-smi, JAX's devices, the versions;
#   2. the paper's CIFAR recipe on Fashion-MNIST: examples/classifier.py with ResNet-20
#      (16/32/64 channels), all 60,000 training and 10,000 test images, batch 128, weight
#      decay 5e-4, 5 warm-up epochs then a cosine decay to 0 over EPOCHS epochs (default 20),
#      the test set evaluated 4 times per epoch; SGD, AdamW, Muon, Eva, K-FAC and Shampoo
#      interleaved, the paper's learning rate 0.1 for SGD, Eva and K-FAC (the example's
#      defaults for the others: AdamW 0.01, Muon 0.02, Shampoo 0.1);
#   3. the character-level transformer (examples/char_lm.py at its defaults: 4 layers,
#      d_model 128, windows of 128 characters, batch 32) for LM_EPOCHS x 1,000 steps
#      (default 4,000), SGD, AdamW, Muon, Eva and K-FAC at the example's rates.
#
# Each part runs under `timeout`, within one budget (BUDGET_S, default 540 s): a part that
# runs out is cut and the next one still runs. Each example writes its own report
# (results.md: final quality, time and steps to SGD's final quality and their ratios to
# SGD's; metrics.json; the plots) into $OUT/<part> if OUT is set, else into
# benchmarks/results/gpu/quality-<UTC date>/<part> (a dry run:
# ${TMPDIR:-/tmp}/eva_optax_gpu_quality_dry_run); log.txt has everything printed.
#
#   bash benchmarks/gpu_quality.sh              # on the GPU machine
#   bash benchmarks/gpu_quality.sh --dry-run    # tiny settings on the CPU, about 2 minutes
#   bash benchmarks/gpu_quality.sh --print      # the python commands of a run, not run
#                                               # (one per line; with --dry-run, the dry run's)
#
# Expects jax with CUDA in .venv (or $PYTHON); see benchmarks/gpu_lib.sh.

set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=${GPU_SH_DRY_RUN:-0}
PRINT=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --print) PRINT=1 ;;
    *) echo "usage: bash benchmarks/gpu_quality.sh [--dry-run] [--print]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "$DRY" = 1 ]; then
  DEST=${OUT:-${TMPDIR:-/tmp}/eva_optax_gpu_quality_dry_run}
  BUDGET=${BUDGET_S:-150}
  CLASSIFIER_S=90; LM_S=50
  CLASSIFIER="--depth 8 --width 4 --epochs 2 --warmup-epochs 1 --train-limit 1024 --test-limit 256
    --eval-every 4"
  LM="--epochs 1 --steps-per-epoch 8 --seq-len 32 --d-model 32 --layers 1 --heads 2
    --eval-every 4 --eval-batches 2"
else
  DEST=${OUT:-benchmarks/results/gpu/quality-$(date -u +%Y-%m-%d)}
  BUDGET=${BUDGET_S:-540}
  CLASSIFIER_S=400; LM_S=130
  EPOCHS=${EPOCHS:-20}
  LM_EPOCHS=${LM_EPOCHS:-4}
  CLASSIFIER="--depth 20 --epochs $EPOCHS --warmup-epochs 5 --eval-every 117"
  LM="--epochs $LM_EPOCHS --steps-per-epoch 1000 --eval-every 100 --eval-batches 20"
fi
RESERVE=0
START=$SECONDS

# shellcheck source=benchmarks/gpu_lib.sh
source benchmarks/gpu_lib.sh

if [ "$PRINT" = 1 ]; then
  part() { shift 2; echo "$@"; }
else
  mkdir -p "$DEST"
  exec > >(tee -a "$DEST/log.txt") 2>&1
  gpu_environment "$DEST"
fi
export TQDM_DISABLE=1

# shellcheck disable=SC2086
part "classifier, the paper's CIFAR recipe" "$CLASSIFIER_S" \
  "$PY" -m examples.classifier $CLASSIFIER --batch-size 128 --weight-decay 5e-4 \
  --optimizers sgd,adamw,muon,eva,kfac,shampoo --lr-sgd 0.1 --lr-eva 0.1 --lr-kfac 0.1 \
  --out "$DEST/classifier"

# shellcheck disable=SC2086
part "character LM" "$LM_S" \
  "$PY" -m examples.char_lm $LM --optimizers sgd,adamw,muon,eva,kfac --out "$DEST/char_lm"

[ "$PRINT" = 1 ] && exit 0
for report in "$DEST"/classifier/results.md "$DEST"/char_lm/results.md; do
  [ -f "$report" ] && { echo "== $report"; cat "$report"; }
done
echo "== done in $(( SECONDS - START ))s; results in $DEST"
