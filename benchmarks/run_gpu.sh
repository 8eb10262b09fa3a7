#!/usr/bin/env bash
# The GPU figures, in one go: benchmarks into results/benchmarks_KIND.md and .jsonl (~4 min
# on an H100), then the `best` and `long` studies with what is left of the budget
# (benchmarks/gpu_studies.sh: records in results/runs/<study>_KIND, tables in
# results/<study>_KIND.md; exit 3 when stopped at the budget, rerun to continue).
#
#   bash benchmarks/run_gpu.sh h100 [SECONDS]   # SECONDS: wall budget (default 480)
# Everything here also runs on CPU, far slower. Benchmarks run with --force: a GPU
# machine's load average says nothing about its GPU.
set -u
kind=${1:?usage: run_gpu.sh KIND [SECONDS]}
budget=${2:-480}
py=${PYTHON:-python3}
start=$SECONDS
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

step() { echo "=== $* ($((SECONDS - start)) s)"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$py -c "import digitjax, jax, flax, optax, orbax.checkpoint as ocp; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'devices', jax.devices())"

step "time to accuracy: fast, 5 seeds, one process each"
$py benchmarks/time_to_accuracy.py --results "benchmarks_$kind" --force --timeout 120

step "5 seeds of fast in one vmapped program, twice (the same numbers both times?)"
det=$(mktemp -d)  # fresh folders: finished runs in old ones would be skipped, not rerun
for w in a b; do
  $py -m digitjax run fast --seeds 0-4 --parallel vmap --no-progress --no-plots \
    --wandb off --workdir "$det/$w" | tail -2
done
$py - "$det" <<'EOF'
import json, pathlib, sys
h = [{p.parent.name: json.loads(p.read_text())["final_param_hash"]
      for p in sorted(pathlib.Path(sys.argv[1], w).glob("*/seed*/summary.json"))} for w in "ab"]
same = h[0] == h[1] and len(h[0]) == 5
print("deterministic across two runs:", same, h[0])
sys.exit(0 if same else 1)
EOF
deterministic=$?

step "throughput vs the Flax example's loop"
$py benchmarks/throughput.py --flag on --steps 1000 --warmup 200 --rounds 3 \
  --peak-gflops "${PEAK_GFLOPS:-67000}" --results "benchmarks_$kind" --force --timeout 300

step "5 seeds: one after another vs one vmapped program"
$py benchmarks/seeds.py --modes sequential,vmap --results "benchmarks_$kind" --force \
  --timeout 300

left=$((budget - (SECONDS - start)))
if [ "$left" -gt 150 ]; then
  step "the best and long studies, ${left} s budget (benchmarks/gpu_studies.sh; resumable)"
  bash benchmarks/gpu_studies.sh "$kind" "$left"
  code=$?
else
  step "no time left for the studies (run: bash benchmarks/gpu_studies.sh $kind)"
  code=3
fi
step done
if [ "$deterministic" -ne 0 ]; then
  echo "=== two runs of fast differed (or did not finish): not deterministic"; code=1
fi
exit $code
