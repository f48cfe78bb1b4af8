#!/usr/bin/env bash
# Run `deltadist train` with BMTrain (engine bmtrain) on N local GPUs, or on one node of several.
#
#   launchers/bmtrain.sh [--nproc N] [--config PATH] [--dry-run]
#                        [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] [deltadist train args...]
#
# BMTrain's ranks are started by torchrun, so this is `launchers/torchrun.sh --engine bmtrain` with
# the rest of the arguments as given (the options are torchrun.sh's: see launchers/torchrun.sh --help):
#
#   torchrun --standalone --nproc-per-node N -m deltadist.cli train [--config PATH] --set engine=bmtrain ...
#
# BMTrain needs CUDA GPUs (it communicates with NCCL): where `$PYTHON` (default `python`) sees none,
# this exits with status 2 before starting anything. --dry-run prints the command on any machine.
# Examples:
#
#   launchers/bmtrain.sh --nproc 8
#   launchers/bmtrain.sh --nproc 8 --nnodes 2 --node-rank 1 --rdzv-endpoint node0:29400 --dry-run
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

dry_run=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --dry-run) dry_run=1 ;;
        --engine|--engine=*)
            echo "bmtrain.sh: the engine is bmtrain here; use launchers/torchrun.sh --engine for the others" >&2
            exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python}
if ((!dry_run)); then
    cuda=$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null || echo False)
    if [[ "$cuda" != True ]]; then
        echo "bmtrain.sh: BMTrain needs CUDA GPUs and torch sees none here; add --dry-run to print the command" >&2
        exit 2
    fi
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" --engine bmtrain "$@"
