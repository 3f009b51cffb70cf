#!/usr/bin/env bash
# Distil a pruned student from its teacher, from the run card megatron-prune wrote. See launch/README.md.
set -euo pipefail
source "$(dirname "$0")/_torchrun.sh"

usage() {
    cat <<'USAGE'
usage: launch/distill.sh [--dry-run] [--cpu|--gpu] RUN_CARD --output-dir OUT [overrides...]

RUN_CARD: OUT_OF_PRUNE/distillation_run_card.yaml (student, teacher, tokenizer, layout, recipe).
GPU (default when torch sees CUDA): Megatron-Bridge distillation under torchrun, launch/bridge_distill.py:
    teacher + student providers from the HF checkpoints, ModelOpt logit-KL, Adam with the card's LR schedule;
    writes OUT/checkpoints (Megatron) and OUT/hf (the distilled student, the next prune's --hf-model).
    overrides: --train-iters --global-batch-size --micro-batch-size --seq-length --lr --min-lr --lr-warmup-iters
    --tensor-model-parallel-size --pipeline-model-parallel-size --data-paths W PREFIX ... --mock-data
    --eval-interval --save-interval --print-settings ... (launch/bridge_distill.py --help)
CPU (--cpu, or no CUDA): python -m megatron_prune.minitron.distill, the small-model KD loop, with the same card
    (python -m megatron_prune.minitron.distill --help for its overrides); writes OUT/hf.

Layout (GPU): NPROC_PER_NODE (default: all GPUs on the node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
RDZV_ID, PYTHON, DRY_RUN=1, as for launch/prune.sh. The card's TP x PP x CP must divide the world size.

examples:
  launch/distill.sh qwen3-pruned/distillation_run_card.yaml --output-dir qwen3-kd --data-paths 1.0 /data/text_document
  NNODES=4 NODE_RANK=$SLURM_NODEID MASTER_ADDR=node0 launch/distill.sh card.yaml --output-dir kd --train-iters 5000
  launch/distill.sh --cpu smollm2-pruned/distillation_run_card.yaml --output-dir smollm2-kd --train-iters 50 --lr-warmup-iters 5 --seq-length 256 --global-batch-size 8 --micro-batch-size 2
USAGE
}

DEVICE=auto
strip_dry_run "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --cpu) DEVICE=cpu; shift ;;
        --gpu) DEVICE=gpu; shift ;;
        -h|--help) usage; exit 0 ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { usage; exit 0; }
CARD=$1
shift
[ -f "$CARD" ] || die "run card '$CARD': no such file (megatron-prune writes distillation_run_card.yaml in its --output-dir)"
has_flag --output-dir "$@" || die "give --output-dir OUT"

if [ "$DEVICE" = auto ]; then
    if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then DEVICE=gpu; else DEVICE=cpu; fi
fi
if [ "$DEVICE" = cpu ]; then
    echo "${0##*/}: no GPU (or --cpu): the CPU distillation loop python -m megatron_prune.minitron.distill" >&2
    run_command "$PYTHON" -m megatron_prune.minitron.distill --run-card "$CARD" "$@"
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(gpu_count)
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
torchrun_command "$NPROC_PER_NODE"
run_command "${TORCHRUN[@]}" "$LAUNCH_DIR/bridge_distill.py" --run-card "$CARD" "$@"
