#!/usr/bin/env bash
# NAS pruning (a parameter / memory budget) under torchrun, on one node or several. See launch/README.md.
set -euo pipefail
source "$(dirname "$0")/_torchrun.sh"

usage() {
    cat <<'USAGE'
usage: launch/prune_nas.sh [--dry-run] --hf-model PATH --output-dir OUT BUDGET [megatron-prune flags...]

Searches the pruned shape within a budget with `python -m megatron_prune` under torchrun: the top-k candidates
are built from one calibration, scored and the best is exported (fixed sizes: launch/prune.sh).
BUDGET: any of --target-params N, --target-active-params N, --target-memory-mb N (N accepts K/M/B, e.g. 6B).
Search: --top-k, --max-width-pruning, --max-depth-pruning, --score-func lm_loss|mmlu, --score-data, --axes-to-skip...
All flags: python -m megatron_prune --help.

Layout: TP, PP, NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID, PYTHON, DRY_RUN=1,
as for launch/prune.sh (launch/prune.sh --help).

examples:
  PP=2 launch/prune_nas.sh --hf-model /models/Qwen3-8B --target-params 6B --top-k 10 --output-dir qwen3-6b
  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 TP=8 launch/prune_nas.sh --hf-model ... --target-params 6B --output-dir ...
USAGE
}

if [ $# -eq 0 ] || has_flag -h "$@" || has_flag --help "$@"; then usage; exit 0; fi
budget=0
for b in --target-params --target-active-params --target-memory-mb; do has_flag "$b" "$@" && budget=1; done
[ "$budget" = 1 ] || die "give a budget: --target-params, --target-active-params or --target-memory-mb (fixed sizes: launch/prune.sh)"
exec bash "$LAUNCH_DIR/prune.sh" --nas "$@"
