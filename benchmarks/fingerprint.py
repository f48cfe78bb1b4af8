"""Backbone fingerprint cost on a ~1.1B-parameter Llama (TinyLlama shape) on CPU.

Compares deltadist's sampled fingerprint (what every save and load checks) with OpenDelta's
approach (an MD5 over every parameter), interleaved in one run.
"""

from __future__ import annotations

import hashlib
import time

import torch

from benchmarks.suite import Ratio, Result


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

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


def run(quick: bool) -> Result:
    from deltadist.core.fingerprint import backbone_fingerprint
    from deltadist.engines import detect_engine

    repeats = 3 if quick else 7
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    engine = detect_engine(model)
    timings: dict[str, list[float]] = {"deltadist fingerprint": [], "MD5 of all parameters (OpenDelta)": []}
    for _ in range(repeats):  # interleaved, so both see the same machine state
        for name, fn in (("deltadist fingerprint", lambda: backbone_fingerprint(model, engine)),
                         ("MD5 of all parameters (OpenDelta)", lambda: md5_all_parameters(model))):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    mine = timings["deltadist fingerprint"]
    spreads = {name: Ratio.of(values, mine) for name, values in timings.items()}
    rows = [[name, f"{Ratio.spread(values).value:.4f}", str(spreads[name])]
            for name, values in timings.items()]
    return Result(
        name="fingerprint", title=f"Backbone fingerprint, Llama {n_params / 1e9:.2f}B parameters, CPU, "
                                  f"{repeats} interleaved repeats",
        columns=["how", "median s", "time / deltadist"], rows=rows,
        data={"parameters": n_params, "seconds": timings}, bars={"fingerprint": spreads},
        bar_label="time / deltadist's fingerprint")
