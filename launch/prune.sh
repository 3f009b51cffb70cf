#!/usr/bin/env bash
# Minitron pruning with manual targets under torchrun, on one node or several. See launch/README.md.
set -euo pipefail
source "$(dirname "$0")/_torchrun.sh"

usage() {
    cat <<'USAGE'
usage: launch/prune.sh [--dry-run] --hf-model PATH --output-dir OUT TARGETS [megatron-prune flags...]

Prunes to fixed sizes with `python -m megatron_prune` under torchrun (NAS budgets: launch/prune_nas.sh).
TARGETS: --export-config '{"hidden_size": 3072, ...}' and/or --target-<axis> N (hidden-size, ffn-hidden-size,
num-attention-heads, num-query-groups, num-layers, MoE sizes). All flags: python -m megatron_prune --help.

Layout (environment, or the flags themselves):
  TP=1 PP=1          --tensor-model-parallel-size / --pipeline-model-parallel-size; DP = world / (TP x PP)
  NPROC_PER_NODE     default: the GPUs on this node, else TP x PP
  NNODES=1           > 1: also NODE_RANK (0..NNODES-1), MASTER_ADDR, MASTER_PORT (29500), RDZV_ID
  PYTHON             default: .venv/bin/python if present, else python3
  DRY_RUN=1          print the torchrun command and exit (same as --dry-run)

examples:
  TP=1 PP=2 launch/prune.sh --hf-model /models/Qwen3-8B --target-ffn-hidden-size 9216 --target-num-layers 30 \
      --calib-data /data/calib.jsonl --output-dir qwen3-pruned
  # two nodes of 8 GPUs, TP=8 PP=2: run on each node with its NODE_RANK
  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 TP=8 PP=2 launch/prune.sh --hf-model ... --output-dir ...
USAGE
}

NAS=0
if [ "${1:-}" = "--nas" ]; then NAS=1; shift; fi   # from launch/prune_nas.sh
strip_dry_run "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
if [ $# -eq 0 ] || has_flag -h "$@" || has_flag --help "$@"; then usage; exit 0; fi

budget=0
for b in --target-params --target-active-params --target-memory-mb; do has_flag "$b" "$@" && budget=1; done
if [ "$NAS" = 0 ] && [ "$budget" = 1 ]; then
    die "NAS budgets (--target-params, --target-active-params, --target-memory-mb) go to launch/prune_nas.sh"
fi

args=("$@")
TP_FLAG=$(flag_value --tensor-model-parallel-size "$@")
PP_FLAG=$(flag_value --pipeline-model-parallel-size "$@")
if [ -n "$TP_FLAG" ] && [ -n "${TP:-}" ] && [ "$TP_FLAG" != "$TP" ]; then die "TP=$TP contradicts --tensor-model-parallel-size $TP_FLAG"; fi
if [ -n "$PP_FLAG" ] && [ -n "${PP:-}" ] && [ "$PP_FLAG" != "$PP" ]; then die "PP=$PP contradicts --pipeline-model-parallel-size $PP_FLAG"; fi
TP=${TP_FLAG:-${TP:-1}}
PP=${PP_FLAG:-${PP:-1}}
[ -n "$TP_FLAG" ] || args+=(--tensor-model-parallel-size "$TP")
[ -n "$PP_FLAG" ] || args+=(--pipeline-model-parallel-size "$PP")

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(gpu_count)
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=$((TP * PP))
fi
check_layout "$TP" "$PP" "$NPROC_PER_NODE"
torchrun_command "$NPROC_PER_NODE"
run_command "${TORCHRUN[@]}" -m megatron_prune "${args[@]}"
