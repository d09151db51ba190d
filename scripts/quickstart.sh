#!/usr/bin/env bash
# The CPU quickstart end to end: set-up, then `sublab run configs/quickstart.yaml` (prints the report path).
# The 3 replicate seeds run in parallel processes, one per free core (at most 3, one torch thread each).
# Extra arguments go to `sublab run`, e.g. scripts/quickstart.sh --set trait.target=dolphin
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=$(.venv/bin/python -c "import os; print(max(1, min(3, len(os.sched_getaffinity(0)) // int(os.environ.get('SUBLAB_THREADS', '1') or 1))))")
exec .venv/bin/sublab run configs/quickstart.yaml --workers "$workers" "$@"
