#!/usr/bin/env bash
# The CPU quickstart end to end: set-up, then `sublab run configs/quickstart.yaml` (prints the report path).
# Extra arguments go to `sublab run`, e.g. scripts/quickstart.sh --set trait.target=dolphin
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sublab run configs/quickstart.yaml "$@"
