"""Peak extra memory on rank 0 while saving a delta from an FSDP2-sharded model (CPU, gloo, 2 ranks).

Side by side in one run, interleaved: deltadist's ``save_finetuned`` (gathers only the LoRA tensors)
versus the usual full-state-dict save (``get_model_state_dict(full_state_dict=True)``, which
gathers the whole backbone to rank 0 before anything can be filtered). Peak extra memory is the
highest resident set size sampled every millisecond during the call minus the RSS just before it.
Prints a table and writes ``benchmarks/results/save_memory.json``.

    python benchmarks/save_memory.py [--hidden 1024] [--layers 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def peak_extra(fn) -> int:
    """Peak RSS above the starting RSS while ``fn`` runs (sampled at ~1 kHz)."""
    start, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss_bytes()) - start


def run(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltadist import LoraModel, wrap_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         vocab_size=32000, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    delta = LoraModel(model, lora_r=4)
    delta.freeze_module(set_state_dict=False)
    wrap_model(model, "fsdp2", torch.device("cpu"))
    results: dict[str, list[int]] = {"deltadist save_finetuned": [], "full state dict + filter": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            dist.barrier()
            results["deltadist save_finetuned"].append(peak_extra(lambda: delta.save_finetuned(tmp)))
            dist.barrier()
            results["full state dict + filter"].append(peak_extra(lambda: {
                k: v for k, v in get_model_state_dict(
                    model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)).items()
                if "lora" in k
            }))
    if rank == 0:
        sizes = {
            "backbone_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                  if "lora" not in n),
            "delta_bytes": sum(t.numel() * t.element_size() for t in delta.state_dict().values()),
        }
        Path(out).write_text(json.dumps({"peak_extra_bytes": results, **sizes}))
    else:
        delta.state_dict()  # the collective rank 0 runs above
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        mp.start_processes(run, args=(2, free_port(), args, out.name), nprocs=2, start_method="spawn")
        data = json.loads(Path(out.name).read_text())
    from rich.console import Console
    from rich.table import Table

    mib = 2**20
    table = Table(title=(f"Peak extra RSS on rank 0 during save, FSDP2 x2 CPU; backbone "
                         f"{data['backbone_bytes'] / mib:.0f} MiB, "
                         f"delta {data['delta_bytes'] / mib:.2f} MiB"))
    for column in ("method", "median MiB", "max MiB", "x delta size"):
        table.add_column(column)
    for name, values in data["peak_extra_bytes"].items():
        median = statistics.median(values)
        table.add_row(name, f"{median / mib:.1f}", f"{max(values) / mib:.1f}",
                      f"{median / data['delta_bytes']:.1f}")
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "save_memory.json").write_text(json.dumps({**data, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
