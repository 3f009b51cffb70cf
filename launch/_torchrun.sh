# Shared by the launch scripts (sourced, not run): the torchrun command line, the layout checks, dry runs.
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node; default: the GPUs torch sees, else TP x PP (CPU: one process per rank)
#   NNODES          nodes (default 1: `--standalone`, a free local port); > 1: c10d rendezvous at
#   MASTER_ADDR     MASTER_ADDR:MASTER_PORT (the first node's address; default 127.0.0.1:29500)
#   MASTER_PORT
#   NODE_RANK       this node's rank, 0..NNODES-1 (default 0); run the same command on every node
#   RDZV_ID         rendezvous id shared by the nodes of one job (default: $SLURM_JOB_ID, else megatron-prune)
#   PYTHON          interpreter (default: the repo's .venv/bin/python if present, else python3)
#   DRY_RUN=1       print the command instead of running it (also: --dry-run anywhere among the arguments)

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LAUNCH_DIR/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=$(command -v python3 || command -v python); fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-megatron-prune}}
DRY_RUN=${DRY_RUN:-0}

die() {
    echo "${0##*/}: error: $*" >&2
    exit 2
}

is_uint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

# flag_value FLAG ARGS...: the value given to FLAG (`--flag V` or `--flag=V`) in ARGS, or nothing
flag_value() {
    local flag=$1
    shift
    while [ $# -gt 0 ]; do
        case "$1" in
            "$flag") echo "${2:-}"; return ;;
            "$flag"=*) echo "${1#*=}"; return ;;
        esac
        shift
    done
}

has_flag() {
    local flag=$1
    shift
    local a
    for a in "$@"; do [[ "$a" == "$flag" || "$a" == "$flag="* ]] && return 0; done
    return 1
}

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# torchrun_command NPROC: sets the array TORCHRUN to the torchrun invocation (module form, so no PATH lookup)
torchrun_command() {
    local nproc=$1
    is_uint "$NNODES" || die "NNODES=$NNODES must be a positive integer"
    is_uint "$nproc" || die "NPROC_PER_NODE=$nproc must be a positive integer"
    TORCHRUN=("$PYTHON" -m torch.distributed.run --nproc-per-node "$nproc")
    if [ "$NNODES" -gt 1 ]; then
        [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1))"
        TORCHRUN+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d
                   --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
    else
        TORCHRUN+=(--standalone)
    fi
}

# check_layout TP PP NPROC: the world (NNODES x NPROC) must be a multiple of TP x PP (the rest is data parallel)
check_layout() {
    local tp=$1 pp=$2 nproc=$3
    is_uint "$tp" || die "tensor-model-parallel size '$tp' must be a positive integer"
    is_uint "$pp" || die "pipeline-model-parallel size '$pp' must be a positive integer"
    local world=$((NNODES * nproc))
    if [ $((world % (tp * pp))) -ne 0 ]; then
        die "world size $world (NNODES=$NNODES x NPROC_PER_NODE=$nproc) is not a multiple of TP=$tp x PP=$pp = $((tp * pp)): choose NPROC_PER_NODE so that NNODES x NPROC_PER_NODE is a multiple of $((tp * pp))"
    fi
}

# strip_dry_run ARGS...: sets DRY_RUN=1 if --dry-run is among ARGS and the array ARGS to the others
strip_dry_run() {
    ARGS=()
    local a
    for a in "$@"; do
        if [ "$a" = --dry-run ]; then DRY_RUN=1; else ARGS+=("$a"); fi
    done
}

# run_command ARGS...: print (DRY_RUN=1) or exec ARGS
run_command() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "$@"
        echo
        exit 0
    fi
    echo "+ $*" >&2
    exec "$@"
}
