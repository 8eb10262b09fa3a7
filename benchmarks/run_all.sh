#!/usr/bin/env bash
# Runs every benchmark in order on an idle machine (~25 min on 2 CPU cores); each rewrites
# its section of results/benchmarks.md and appends to results/benchmarks.jsonl.
# Extra arguments go to every script, e.g. `bash benchmarks/run_all.sh --force`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# The 1-minute load average lags: after each benchmark it takes ~2 minutes to fall below
# the idle threshold, so each script waits for it (and refuses if other work keeps it up).
WAIT=(--wait-idle 300)
status=0
for script in throughput seeds time_to_accuracy startup data_parallel; do
    echo "== benchmarks/$script.py" >&2
    rc=0
    "$PY" "benchmarks/$script.py" "${WAIT[@]}" "$@" || rc=$?
    if [ "$rc" -eq 1 ]; then
        status=1  # a run failed (recorded in its section): go on with the others
    elif [ "$rc" -ne 0 ]; then
        exit "$rc"  # 3: refused, the machine is busy; 2: bad arguments; 127: no Python
    fi
done
exit "$status"
