#!/usr/bin/env bash
# The `best` and `long` studies on a lent GPU within one wall budget: each lane below is a
# process training one experiment's 5 seeds at a time in one vmapped program; the lanes run
# side by side, so one lane's compile, evaluation and checkpoint writes overlap another's
# training. At the budget every lane gets SIGTERM (saves, resumable: rerun to continue).
# Records and each experiment's ensemble.json land in $RUNS/<study>_KIND (default
# results/runs), tables in results/<study>_KIND.md.
# JAX's compilation cache is kept in $JAX_COMPILATION_CACHE_DIR for a continuation on the
# same machine.
#
#   bash benchmarks/gpu_studies.sh h200 [SECONDS]   # default 540
#
# Train seconds and images/s in these tables were measured with the lanes sharing the GPU.
set -u
kind=${1:?usage: gpu_studies.sh KIND [SECONDS]}
budget=${2:-540}
py=${PYTHON:-python3}
runs=${RUNS:-results/runs}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/digitjax_jax_cache}
start=$SECONDS
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.2}
cd "$(dirname "$0")/.."
logs=${LOGS:-/tmp/gpu_studies_logs}
mkdir -p "$logs"

lanes=(
  "long long_bn_cnn"
  "long long_bn_cnn_cutout"
  "best best_bn_cnn_30ep best_bn_cnn_ema best_bn_cnn_cutout best_bn_cnn"
)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$py -c "import digitjax, jax; print('jax', jax.__version__, jax.devices())" || exit 1
# Prepare the data once, before the lanes would race to.
$py -c "import digitjax.data as d; d.prepare('mnist', progress=False)" || exit 1

lane() {  # study experiment...
  local study=$1; shift
  for e in "$@"; do
    local left=$((budget - (SECONDS - start) - 30))
    [ "$left" -gt 30 ] || return
    echo "=== $e start $((SECONDS - start)) s"
    timeout --signal=TERM --kill-after=45 "$left" \
      $py -m digitjax run "$e" --seeds 0-4 --parallel vmap --no-progress --no-plots \
      --wandb off --workdir "$runs/${study}_$kind" || return
    # The ensemble needs the checkpoints, which stay on this machine: record it here.
    $py -m digitjax ensemble "$e" --workdir "$runs/${study}_$kind" || return
    echo "=== $e done $((SECONDS - start)) s"
  done
}

( while sleep 20; do  # GPU use over time: is there room for the lanes side by side?
    echo "$((SECONDS - start)) s $(nvidia-smi --query-gpu=utilization.gpu,memory.used \
      --format=csv,noheader 2>/dev/null)"
  done ) > "$logs/gpu_use.log" 2>&1 &
monitor=$!

pids=()
for l in "${lanes[@]}"; do
  lane $l > "$logs/lane${#pids[@]}.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
kill $monitor 2>/dev/null
grep -h "===\|accuracy\|Error\|error" "$logs"/lane*.log
for study in best long; do
  $py -m digitjax table "$study" --workdir "$runs/${study}_$kind"
done
echo "done in $((SECONDS - start)) s"
