#!/usr/bin/env bash
# Run `deltadist train` on N local processes with torchrun.
#
#   launchers/torchrun.sh [--nproc N] [--engine ddp|fsdp2|fsdp1] [--config PATH] [deltadist train args...]
#
# runs
#
#   torchrun --standalone --nproc-per-node N -m deltadist.cli train [--config PATH] [--set engine=E] [args...]
#
# (torchrun is invoked as `$PYTHON -m torch.distributed.run`, the same program, so the Python that
# has deltadist installed is the one used; PYTHON defaults to `python`.)
#
#   --nproc N     ranks on this machine (default: the number of visible GPUs, else 2)
#   --engine E    ddp, fsdp2 or fsdp1: passed on as `--set engine=E`. Without it the config's engine
#                 is used; without --config either, ddp (the built-in config's engine is `plain`).
#   --config P    the job's YAML (default: the built-in configs/minilm_lora.yaml)
#   anything else is passed to `deltadist train`, e.g. --set training.epochs=2
#
# `--standalone` runs a local rendezvous on a free port, so several launches can run side by side.
# On the CPU (gloo) each rank gets OMP_NUM_THREADS = cores / N unless OMP_NUM_THREADS is set.
# training.batch_size is the global batch and must be divisible by N. Examples:
#
#   launchers/torchrun.sh --nproc 2 --engine fsdp2
#   launchers/torchrun.sh --nproc 4 --config configs/minilm_lora_fsdp1.yaml --set training.epochs=2
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

nproc=""
engine=""
config=""
extra=()
while (($#)); do
    case "$1" in
        --nproc|--nproc-per-node|--engine|--config)
            (($# >= 2)) || { echo "torchrun.sh: $1 needs a value" >&2; exit 2; }
            case "$1" in --nproc*) nproc=$2 ;; --engine) engine=$2 ;; --config) config=$2 ;; esac
            shift 2 ;;
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
    ""|ddp|fsdp2|fsdp1) ;;
    plain) echo "torchrun.sh: engine plain runs one process; run 'deltadist train' directly" >&2; exit 2 ;;
    *) echo "torchrun.sh: --engine must be ddp, fsdp2 or fsdp1, got '$engine'" >&2; exit 2 ;;
esac
[[ -n "$engine" || -n "$config" ]] || engine=ddp

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo "$nproc")
    threads=$((cores / nproc))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

args=(train)
[[ -z "$config" ]] || args+=(--config "$config")
[[ -z "$engine" ]] || args+=(--set "engine=$engine")
args+=("${extra[@]+"${extra[@]}"}")

echo "+ OMP_NUM_THREADS=$OMP_NUM_THREADS torchrun --standalone --nproc-per-node $nproc -m deltadist.cli ${args[*]}" >&2
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m deltadist.cli "${args[@]}"
