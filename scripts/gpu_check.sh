#!/usr/bin/env bash
# The GPU-only checks (Transformer Engine layer specs, Mamba CUDA kernels), when a GPU is present; else a skip.
#   bash scripts/gpu_check.sh            # e.g. inside the Docker image: docker run --gpus all IMAGE bash scripts/gpu_check.sh
#   PYTHON=python3 bash scripts/gpu_check.sh
# Prints what it finds (GPU, torch, CUDA, Transformer Engine, mamba_ssm, causal_conv1d), runs scripts/gpu_check.py
# with timings, and exits with its status; exits 0 with "no GPU: skipped" on a machine without one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no GPU: skipped (nvidia-smi finds no device)"
    exit 0
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no GPU: skipped (nvidia-smi sees a device but torch.cuda.is_available() is False: a CPU build of torch?)"
    exit 0
fi
nvidia-smi -L
"$PYTHON" - <<'PY'
import importlib, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
for name in ("transformer_engine", "mamba_ssm", "causal_conv1d", "megatron.core", "megatron.bridge"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except Exception as e:  # reported; the check that needs it fails with the reason
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
PY
start=$(date +%s)
status=0
"$PYTHON" scripts/gpu_check.py "$@" || status=$?
echo "gpu_check: finished in $(( $(date +%s) - start ))s with status $status"
exit $status
