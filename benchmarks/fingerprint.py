"""Backbone fingerprint cost on a ~1.1B-parameter Llama (TinyLlama shape) on CPU.

Compares deltadist's sampled fingerprint with OpenDelta's approach (MD5 over every parameter),
interleaved in one run. Prints a table and writes ``benchmarks/results/fingerprint.json``.

    python benchmarks/fingerprint.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from deltadist.core.fingerprint import backbone_fingerprint
from deltadist.engines import detect_engine

RESULTS = Path(__file__).parent / "results"


def build_model() -> torch.nn.Module:
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02, generator=generator)
    return model


def md5_all_parameters(model: torch.nn.Module) -> str:
    """OpenDelta-style: hash every value of every parameter."""
    digest = hashlib.md5()
    for _, param in model.named_parameters():
        digest.update(param.detach().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    engine = detect_engine(model)
    timings: dict[str, list[float]] = {"deltadist fingerprint": [], "md5 of all parameters": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        for name, fn in (("deltadist fingerprint", lambda: backbone_fingerprint(model, engine)),
                         ("md5 of all parameters", lambda: md5_all_parameters(model))):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in timings.items()}
    table = Table(title=f"Backbone fingerprint, Llama {n_params / 1e9:.2f}B params, CPU")
    for column in ("method", "median s", "min s", "ratio"):
        table.add_column(column)
    base = medians["deltadist fingerprint"]
    for name, values in timings.items():
        table.add_row(name, f"{medians[name]:.4f}", f"{min(values):.4f}", f"{medians[name] / base:.0f}x")
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    out = {"parameters": n_params, "repeats": args.repeats, "seconds": timings, "median": medians}
    (RESULTS / "fingerprint.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
