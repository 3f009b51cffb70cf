#!/usr/bin/env bash
# Peers the benchmarks compare against (not needed by the package or its tests):
#   torchprofile 0.0.4   Model Optimizer's FastNAS counts FLOPs with it (its declared torchvision dep is unused)
#   torch-pruning        the other vision pruner (benchmarks/fastnas)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt --no-deps)
"${PIP[@]}" torchprofile==0.0.4 torch-pruning==1.6.1
.venv/bin/python -c "import torchprofile, torch_pruning; print('bench peers ok: torch-pruning', torch_pruning.__version__)"
