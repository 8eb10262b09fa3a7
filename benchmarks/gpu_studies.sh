#!/usr/bin/env bash
# The `best` and `long` studies on a lent GPU within one wall budget: each lane below is a
# process training one experiment's 5 seeds at a time in one vmapped program; the lanes run
# side by side, so one lane's compile, evaluation and checkpoint writes overlap another's
# training. Each lane's run gets SIGTERM 70 s before the budget (it saves and exits:
# resumable) and SIGKILL 40 s before; the rest is for the tables. Exit status: 0 all done,
# 3 stopped at the budget (run it again on the same machine to continue), 1 a failure.
# Records and each experiment's ensemble.json (`digitjax run` records it here, where the
# checkpoints are, once all 5 seeds have finished) land in $RUNS/<study>_KIND (default
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
runs=results/runs
[ -z "${RUNS:-}" ] || runs=$(realpath -m "$RUNS")  # before the cd below
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/digitjax_jax_cache}
start=$SECONDS
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.2}
logs=${LOGS:-/tmp/gpu_studies_logs}
mkdir -p "$logs" && logs=$(realpath "$logs")
cd "$(dirname "$0")/.."

lanes=(
  "long long_bn_cnn"
  "long long_bn_cnn_cutout"
  "best best_bn_cnn_30ep best_bn_cnn_ema best_bn_cnn_cutout best_bn_cnn"
)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$py -c "import digitjax, jax; print('jax', jax.__version__, jax.devices())" || exit 1
# Prepare the data once, before the lanes would race to.
$py -c "import digitjax.data as d; d.prepare('mnist', progress=False)" || exit 1

# Every lane ends by `stop_at`, leaving the rest of the budget for the tables.
stop_at=$((budget - 40))

lane() {  # study experiment... -> 0: all done, 3: stopped at the budget, 1: failed
  local study=$1; shift
  local w="$runs/${study}_$kind" e code
  for e in "$@"; do
    local left=$((stop_at - (SECONDS - start)))
    [ "$left" -gt 60 ] || return 3
    echo "=== $e start $((SECONDS - start)) s"
    # SIGTERM 30 s before stop_at (the run saves and exits), SIGKILL at stop_at.
    timeout --signal=TERM --kill-after=30 $((left - 30)) \
      $py -m digitjax run "$e" --seeds 0-4 --parallel vmap --no-progress --no-plots \
      --wandb off --workdir "$w"
    code=$?
    case $code in
      0) ;;
      1) echo "=== $e: a seed diverged (final); going on" ;;
      124|137) echo "=== $e stopped at the budget $((SECONDS - start)) s"; return 3 ;;
      *) echo "=== $e failed (exit $code)"; return 1 ;;
    esac
    echo "=== $e done $((SECONDS - start)) s"
  done
}

( while sleep 20; do  # GPU use over time: is there room for the lanes side by side?
    echo "$((SECONDS - start)) s $(nvidia-smi --query-gpu=utilization.gpu,memory.used \
      --format=csv,noheader 2>/dev/null)"
  done ) > "$logs/gpu_use.log" 2>&1 &
monitor=$!
pids=()
trap 'kill $monitor "${pids[@]}" 2>/dev/null' EXIT

for l in "${lanes[@]}"; do
  lane $l > "$logs/lane${#pids[@]}.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  wait "$p"
  code=$?
  if [ "$code" -eq 1 ] || { [ "$code" -eq 3 ] && [ "$status" -eq 0 ]; }; then status=$code; fi
done
grep -h "===\|accuracy" "$logs"/lane*.log
for study in best long; do
  $py -m digitjax table "$study" --workdir "$runs/${study}_$kind" || status=1
done
echo "done in $((SECONDS - start)) s"
exit $status
