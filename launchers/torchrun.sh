#!/usr/bin/env bash
# Run `deltadist train` on N local processes with torchrun.
#
#   launchers/torchrun.sh [--nproc N] [--engine ddp|fsdp2|fsdp1|bmtrain] [--config PATH] [--dry-run]
#                         [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] [deltadist train args...]
#
# runs
#
#   torchrun --standalone --nproc-per-node N -m deltadist.cli train [--config PATH] [--set engine=E] [args...]
#
# or, on each of M nodes (the same command everywhere but --node-rank),
#
#   torchrun --nnodes M --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID
#            --nproc-per-node N -m deltadist.cli train ...
#
# (torchrun is invoked as `$PYTHON -m torch.distributed.run`, the same program, so the Python that
# has deltadist installed is the one used; PYTHON defaults to `python`.)
#
#   --nproc N     ranks on this machine (default: the number of visible GPUs, else 2)
#   --engine E    ddp, fsdp2, fsdp1 or bmtrain: passed on as `--set engine=E`. Without it the config's
#                 engine is used; without --config either, ddp (the built-in config's engine is `plain`).
#                 (launchers/bmtrain.sh is this with --engine bmtrain and a CUDA check.)
#   --config P    the job's YAML (default: the built-in configs/minilm_lora.yaml)
#   --nnodes M, --node-rank R, --rdzv-endpoint HOST:PORT
#                 a job on M nodes meeting at HOST:PORT (a c10d rendezvous hosted by the first node
#                 to arrive; use node 0's address). RDZV_ID (default deltadist) names the job.
#   --dry-run     print the command (also printed before running) and exit
#   anything else is passed to `deltadist train`, e.g. --set training.epochs=2
#
# `--standalone` runs a local rendezvous on a free port, so several launches can run side by side.
# On the CPU (gloo) each rank gets OMP_NUM_THREADS = cores / N unless OMP_NUM_THREADS is set.
# training.batch_size is the global batch and must be divisible by N. Examples:
#
#   launchers/torchrun.sh --nproc 2 --engine fsdp2
#   launchers/torchrun.sh --nproc 4 --config configs/minilm_lora_fsdp1.yaml --set training.epochs=2
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

nproc=""
engine=""
config=""
nnodes=1
node_rank=0
endpoint=""
dry_run=0
extra=()
while (($#)); do
    case "$1" in
        --nproc|--nproc-per-node|--engine|--config|--nnodes|--node-rank|--rdzv-endpoint)
            (($# >= 2)) || { echo "torchrun.sh: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --nproc*) nproc=$2 ;; --engine) engine=$2 ;; --config) config=$2 ;;
                --nnodes) nnodes=$2 ;; --node-rank) node_rank=$2 ;; --rdzv-endpoint) endpoint=$2 ;;
            esac
            shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --nproc=*|--nproc-per-node=*) nproc=${1#*=}; shift ;;
        --engine=*) engine=${1#*=}; shift ;;
        --config=*) config=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) extra+=("$1"); shift ;;
    esac
done

PYTHON=${PYTHON:-python}
if [[ -z "$nproc" ]]; then
    nproc=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    ((nproc > 0)) || nproc=2
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "torchrun.sh: --nproc must be a positive integer, got '$nproc'" >&2; exit 2; }
case "$engine" in
    ""|ddp|fsdp2|fsdp1|bmtrain) ;;
    plain) echo "torchrun.sh: engine plain runs one process; run 'deltadist train' directly" >&2; exit 2 ;;
    *) echo "torchrun.sh: --engine must be ddp, fsdp2, fsdp1 or bmtrain, got '$engine'" >&2; exit 2 ;;
esac
[[ -n "$engine" || -n "$config" ]] || engine=ddp
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || { echo "torchrun.sh: --nnodes must be a positive integer, got '$nnodes'" >&2; exit 2; }
[[ "$node_rank" =~ ^[0-9]+$ ]] && ((node_rank < nnodes)) || {
    echo "torchrun.sh: --node-rank must be 0..$((nnodes - 1)), got '$node_rank'" >&2; exit 2; }
if ((nnodes > 1)) && [[ ! "$endpoint" =~ ^[^:]+:[0-9]+$ ]]; then
    echo "torchrun.sh: --nnodes $nnodes needs --rdzv-endpoint HOST:PORT (node 0's address and a free port)" >&2
    exit 2
fi

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo "$nproc")
    threads=$((cores / nproc))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

args=(train)
[[ -z "$config" ]] || args+=(--config "$config")
[[ -z "$engine" ]] || args+=(--set "engine=$engine")
args+=("${extra[@]+"${extra[@]}"}")

if ((nnodes > 1)); then
    launch=(--nnodes "$nnodes" --node-rank "$node_rank" --rdzv-backend c10d --rdzv-endpoint "$endpoint"
            --rdzv-id "${RDZV_ID:-deltadist}")
else
    launch=(--standalone)
fi
command=(torchrun "${launch[@]}" --nproc-per-node "$nproc" -m deltadist.cli "${args[@]}")
echo "+ OMP_NUM_THREADS=$OMP_NUM_THREADS ${command[*]}" >&2
((dry_run)) && { echo "OMP_NUM_THREADS=$OMP_NUM_THREADS ${command[*]}"; exit 0; }
exec "$PYTHON" -m torch.distributed.run "${command[@]:1}"
