#!/usr/bin/env bash
# Run `deltadist train` with DeepSpeed ZeRO on N local processes, or on the hosts of a hostfile.
#
#   launchers/deepspeed.sh [--nproc N] [--config YAML] [--ds-config JSON] [--dry-run] [--] [deltadist train args...]
#   launchers/deepspeed.sh --hostfile FILE [--num-nodes M] [--master-addr A] [--master-port P] [--nproc N] ...
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
# With --hostfile (several nodes) it runs the DeepSpeed launcher on this machine, which starts the
# ranks on every host of the file over ssh (pdsh; passwordless ssh to each host, and deltadist at
# the same path on each, are needed):
#
#   deepspeed --hostfile FILE [--num_nodes M] [--master_addr A] [--master_port P] [--num_gpus N] \
#       --no_local_rank --module deltadist.cli train [--config YAML] --set engine=deepspeed ...
#
#   --nproc N        ranks on this machine (default: the number of visible GPUs, else 2); with
#                    --hostfile, at most N per host (--num_gpus N; default: each host's slots)
#   --config P       the job's YAML (default: the built-in configs/minilm_lora.yaml)
#   --ds-config J    a DeepSpeed JSON, e.g. configs/deepspeed/zero3.json (passed on as
#                    --set deepspeed_config=J; default: the engine's built-in ZeRO-3 config)
#   --hostfile F     DeepSpeed hostfile: one line per host, `HOST slots=GPUS` (`node0 slots=8`)
#   --num-nodes M    use the first M hosts of the hostfile (default: all)
#   --master-addr A  node 0's address as the other hosts reach it (default: DeepSpeed's guess,
#                    the first address of `hostname -I` on the first host)
#   --master-port P  the rendezvous port on node 0 (default: DeepSpeed's, 29500)
#   --dry-run        print the command (also printed before running) and exit
#   --               ends the launcher's options; everything after it (and any option the launcher
#                    does not know) goes to `deltadist train`, e.g. --set training.epochs=2
#
# `--no_local_rank`: the DeepSpeed launcher would otherwise put --local_rank=R in front of the
# arguments; deltadist reads LOCAL_RANK from the environment, which both launchers set.
# The DeepSpeed launcher passes only some variables to the other hosts (NCCL_*, PYTHON*, UCX*, ...):
# put others, one `NAME=VALUE` a line, in .deepspeed_env in the home or current directory.
# training.batch_size is the global batch and must be divisible by the number of ranks. DeepSpeed's
# first start on a CPU machine compiles a small shared-memory op (about a minute, cached in
# ~/.cache/torch_extensions). Examples:
#
#   launchers/deepspeed.sh --nproc 2
#   launchers/deepspeed.sh --nproc 8 --ds-config configs/deepspeed/zero3_offload.json -- --set training.epochs=2
#   launchers/deepspeed.sh --hostfile hostfile --master-addr node0 -- --config configs/minilm_lora.yaml
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

nproc=""
config=""
ds_config=""
hostfile=""
num_nodes=""
master_addr=""
master_port=""
dry_run=0
extra=()
while (($#)); do
    case "$1" in
        --nproc|--nproc-per-node|--num_gpus|--config|--ds-config|--hostfile|--num-nodes|--master-addr|--master-port)
            (($# >= 2)) || { echo "deepspeed.sh: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --nproc*|--num_gpus) nproc=$2 ;; --config) config=$2 ;; --ds-config) ds_config=$2 ;;
                --hostfile) hostfile=$2 ;; --num-nodes) num_nodes=$2 ;;
                --master-addr) master_addr=$2 ;; --master-port) master_port=$2 ;;
            esac
            shift 2 ;;
        --nproc=*|--nproc-per-node=*|--num_gpus=*) nproc=${1#*=}; shift ;;
        --config=*) config=${1#*=}; shift ;;
        --ds-config=*) ds_config=${1#*=}; shift ;;
        --hostfile=*) hostfile=${1#*=}; shift ;;
        --num-nodes=*) num_nodes=${1#*=}; shift ;;
        --master-addr=*) master_addr=${1#*=}; shift ;;
        --master-port=*) master_port=${1#*=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra+=("$@"); break ;;
        *) extra+=("$1"); shift ;;
    esac
done

fail() { echo "deepspeed.sh: $*" >&2; exit 2; }
[[ -z "$nproc" || "$nproc" =~ ^[1-9][0-9]*$ ]] || fail "--nproc must be a positive integer, got '$nproc'"
[[ -z "$ds_config" || -f "$ds_config" ]] || fail "--ds-config: no such file: $ds_config"
if [[ -z "$hostfile" ]]; then
    for given in "--num-nodes:$num_nodes" "--master-addr:$master_addr" "--master-port:$master_port"; do
        [[ -z "${given#*:}" ]] || fail "${given%%:*} is for a multi-node job: add --hostfile FILE"
    done
else
    [[ -f "$hostfile" ]] || fail "--hostfile: no such file: $hostfile"
    hosts=0
    while IFS= read -r line || [[ -n "$line" ]]; do  # as DeepSpeed reads it: each line `HOST slots=N`
        line=${line#"${line%%[![:space:]]*}"}
        [[ -z "${line//[[:space:]]/}" || "$line" == \#* ]] && continue
        [[ "$line" =~ ^[^[:space:]]+[[:space:]]+slots=[0-9]+ ]] ||
            fail "--hostfile $hostfile: '$line' is not 'HOST slots=N' (e.g. 'node0 slots=8')"
        hosts=$((hosts + 1))
    done < "$hostfile"
    ((hosts > 0)) || fail "--hostfile $hostfile lists no host: one line per host, 'HOST slots=N'"
    [[ -z "$num_nodes" || "$num_nodes" =~ ^[1-9][0-9]*$ ]] ||
        fail "--num-nodes must be a positive integer, got '$num_nodes'"
    [[ -z "$master_port" || ("$master_port" =~ ^[1-9][0-9]{0,4}$ && "$master_port" -le 65535) ]] ||
        fail "--master-port must be a port number (1-65535), got '$master_port'"
fi

args=(train)
[[ -z "$config" ]] || args+=(--config "$config")
args+=(--set engine=deepspeed)
[[ -z "$ds_config" ]] || args+=(--set "deepspeed_config=$ds_config")
args+=("${extra[@]+"${extra[@]}"}")

PYTHON=${PYTHON:-python}

# quoted ARGS...: the arguments as one line a shell (or Python's shlex.split) reads back as they are.
quoted() {
    local arg q="'" out=()
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+=("$arg"); else out+=("$q${arg//$q/$q\\$q$q}$q"); fi
    done
    echo "${out[*]}"
}

# launch VARIABLES NAME MODULE ARGS...: show `VARIABLES NAME ARGS...` (shell-quoted) on stderr, and on
# stdout for --dry-run (then exit); else run `$PYTHON -m MODULE ARGS...`.
launch() {
    local variables=$1 name=$2 module=$3 line
    shift 3
    line="${variables:+$variables }$(quoted "$name" "$@")"
    echo "+ $line" >&2
    ((!dry_run)) || { echo "$line"; exit 0; }
    exec "$PYTHON" -m "$module" "$@"
}

if [[ -n "$hostfile" ]]; then
    runner=(--hostfile "$hostfile")
    [[ -z "$num_nodes" ]] || runner+=(--num_nodes "$num_nodes")
    [[ -z "$master_addr" ]] || runner+=(--master_addr "$master_addr")
    [[ -z "$master_port" ]] || runner+=(--master_port "$master_port")
    [[ -z "$nproc" ]] || runner+=(--num_gpus "$nproc")
    launch "" deepspeed deepspeed.launcher.runner "${runner[@]}" --no_local_rank --module deltadist.cli "${args[@]}"
fi

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
[[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
if [[ -z "$nproc" ]]; then
    nproc=$gpus
    ((nproc > 0)) || nproc=2
fi
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if ((gpus > 0)); then
    launch "" deepspeed deepspeed.launcher.runner --num_gpus "$nproc" --no_local_rank --master_port "$(free_port)" \
        --module deltadist.cli "${args[@]}"
fi

export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo "$nproc")
    threads=$((cores / nproc))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi
variables="DS_ACCELERATOR=$DS_ACCELERATOR OMP_NUM_THREADS=$OMP_NUM_THREADS"
if [[ "${DEEPSPEED_CPU_LAUNCHER:-torchrun}" == deepspeed ]]; then
    launch "$variables" deepspeed deepspeed.launcher.runner --num_nodes 1 --num_gpus "$nproc" --no_local_rank \
        --master_port "$(free_port)" --module deltadist.cli "${args[@]}"
fi
launch "$variables" torchrun torch.distributed.run --standalone --nproc-per-node "$nproc" -m deltadist.cli "${args[@]}"
