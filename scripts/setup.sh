#!/usr/bin/env bash
# Creates .venv at the repository root and installs the project with its test tools.
# torch is installed first and pinned: on the development machine torch==2.13.0 is a local
# CPU wheel; without the pin, resolving lightning pulls a multi-GB CUDA build.
# On a GPU machine the same pin resolves to PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import crma_lightning, pytest, hypothesis" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
fi
