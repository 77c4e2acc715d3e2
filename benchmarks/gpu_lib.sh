# Shared by the GPU scripts (benchmarks/gpu.sh, benchmarks/gpu_quality.sh); sourced, not run.
#
# Expects BUDGET (seconds for the whole script), START (the script's $SECONDS at its start),
# RESERVE (seconds kept for the end), PY (the python) and DRY (1 for a dry run on the CPU).

# left: seconds the budget still has, less the reserve.
left() { echo $(( BUDGET - (SECONDS - START) - RESERVE )); }

# part NAME LIMIT_S COMMAND...: COMMAND under `timeout`, at most LIMIT_S and what is left.
# A part that runs out is cut; the script goes on with the next one.
part() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  local rest
  rest=$(left)
  (( limit > rest )) && limit=$rest
  if (( limit < 5 )); then
    echo "== $name: skipped, the budget is spent"
    return 0
  fi
  echo "== $name (at most ${limit}s; $(date -u +%T))"
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  (( rc == 124 || rc == 137 )) && echo "== $name: cut after ${limit}s"
  echo "== $name: exit $rc after $(( SECONDS - t0 ))s"
  return 0
}

# gpu_environment DEST: prints the GPU, JAX's devices and the versions. Outside a dry run,
# when JAX sees no GPU it tries `pip install "jax[cuda12]"` once and exits 1 if that fails.
gpu_environment() {
  echo "== environment ($(date -u)); dry run: $DRY; results in $1"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  if [ "$DRY" != 1 ] && ! "$PY" -c 'import jax; jax.devices("gpu")' >/dev/null 2>&1; then
    echo "JAX sees no GPU; trying: $PY -m pip install 'jax[cuda12]'"
    timeout 120 "$PY" -m pip install -q "jax[cuda12]" || true
    if ! "$PY" -c 'import jax; jax.devices("gpu")'; then
      echo "error: JAX has no GPU backend here and jax[cuda12] could not be installed" \
        "(no internet?). Install jax with CUDA into $PY's environment and rerun." >&2
      exit 1
    fi
  fi
  "$PY" - <<'EOF'
import sys, jax, jaxlib, optax, flax, numpy, eva_optax
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__,
      "optax", optax.__version__, "flax", flax.__version__, "numpy", numpy.__version__,
      "eva_optax", eva_optax.__version__)
print("backend", jax.default_backend(), "devices", jax.devices(),
      "kind", getattr(jax.devices()[0], "device_kind", ""))
EOF
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
}
