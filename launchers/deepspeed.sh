#!/usr/bin/env bash
# Run `deltadist train` with DeepSpeed ZeRO on N local processes.
#
#   launchers/deepspeed.sh [--nproc N] [--config YAML] [--ds-config JSON] [--] [deltadist train args...]
#
# With CUDA it runs the DeepSpeed launcher (invoked as `$PYTHON -m deepspeed.launcher.runner`, the
# program behind the `deepspeed` command, so the Python that has deltadist installed is the one used):
#
#   deepspeed --num_gpus N --no_local_rank --master_port <free port> --module deltadist.cli train \
#       [--config YAML] --set engine=deepspeed [--set deepspeed_config=JSON] [args...]
#
# Without CUDA (CPU, gloo) it sets DS_ACCELERATOR=cpu and starts the ranks with torchrun instead
# (`$PYTHON -m torch.distributed.run --standalone --nproc-per-node N -m deltadist.cli train ...`):
# both work on the CPU, torchrun picks a free port by itself and OMP_NUM_THREADS is set to
# cores / N unless already set. `deepspeed --num_nodes 1 --num_gpus N` with DS_ACCELERATOR=cpu
# works too (DEEPSPEED_CPU_LAUNCHER=deepspeed selects it).
#
#   --nproc N        ranks on this machine (default: the number of visible GPUs, else 2)
#   --config P       the job's YAML (default: the built-in configs/minilm_lora.yaml)
#   --ds-config J    a DeepSpeed JSON, e.g. configs/deepspeed/zero3.json (passed on as
#                    --set deepspeed_config=J; default: the engine's built-in ZeRO-3 config)
#   --               ends the launcher's options; everything after it (and any option the launcher
#                    does not know) goes to `deltadist train`, e.g. --set training.epochs=2
#
# `--no_local_rank`: the DeepSpeed launcher would otherwise put --local_rank=R in front of the
# arguments; deltadist reads LOCAL_RANK from the environment, which both launchers set.
# training.batch_size is the global batch and must be divisible by N. DeepSpeed's first start on a
# CPU machine compiles a small shared-memory op (about a minute, cached in ~/.cache/torch_extensions).
# Examples:
#
#   launchers/deepspeed.sh --nproc 2
#   launchers/deepspeed.sh --nproc 8 --ds-config configs/deepspeed/zero3_offload.json -- --set training.epochs=2
set -euo pipefail

usage() { sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; }

nproc=""
config=""
ds_config=""
extra=()
while (($#)); do
    case "$1" in
        --nproc|--nproc-per-node|--num_gpus|--config|--ds-config)
            (($# >= 2)) || { echo "deepspeed.sh: $1 needs a value" >&2; exit 2; }
            case "$1" in --nproc*|--num_gpus) nproc=$2 ;; --config) config=$2 ;; --ds-config) ds_config=$2 ;; esac
            shift 2 ;;
        --nproc=*|--nproc-per-node=*|--num_gpus=*) nproc=${1#*=}; shift ;;
        --config=*) config=${1#*=}; shift ;;
        --ds-config=*) ds_config=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra+=("$@"); break ;;
        *) extra+=("$1"); shift ;;
    esac
done

PYTHON=${PYTHON:-python}
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ -z "$nproc" ]]; then
    nproc=$gpus
    ((nproc > 0)) || nproc=2
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "deepspeed.sh: --nproc must be a positive integer, got '$nproc'" >&2; exit 2; }
[[ -z "$ds_config" || -f "$ds_config" ]] || { echo "deepspeed.sh: --ds-config: no such file: $ds_config" >&2; exit 2; }

args=(train)
[[ -z "$config" ]] || args+=(--config "$config")
args+=(--set engine=deepspeed)
[[ -z "$ds_config" ]] || args+=(--set "deepspeed_config=$ds_config")
args+=("${extra[@]+"${extra[@]}"}")

if ((gpus > 0)); then
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "+ deepspeed --num_gpus $nproc --no_local_rank --master_port $port --module deltadist.cli ${args[*]}" >&2
    exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$nproc" --no_local_rank --master_port "$port" \
        --module deltadist.cli "${args[@]}"
fi

export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo "$nproc")
    threads=$((cores / nproc))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi
if [[ "${DEEPSPEED_CPU_LAUNCHER:-torchrun}" == deepspeed ]]; then
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "+ DS_ACCELERATOR=$DS_ACCELERATOR OMP_NUM_THREADS=$OMP_NUM_THREADS deepspeed --num_nodes 1 --num_gpus $nproc --no_local_rank --master_port $port --module deltadist.cli ${args[*]}" >&2
    exec "$PYTHON" -m deepspeed.launcher.runner --num_nodes 1 --num_gpus "$nproc" --no_local_rank \
        --master_port "$port" --module deltadist.cli "${args[@]}"
fi
echo "+ DS_ACCELERATOR=$DS_ACCELERATOR OMP_NUM_THREADS=$OMP_NUM_THREADS torchrun --standalone --nproc-per-node $nproc -m deltadist.cli ${args[*]}" >&2
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m deltadist.cli "${args[@]}"
