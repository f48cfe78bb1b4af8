"""QLoRA: a Llama's linear weights in NF4 against the same LoRA on its full-precision weights.

Three measurements, each contender in a fresh process where memory is measured:

* **loading** a saved checkpoint (Llama h1024 x 4, or h512 x 4 with ``--quick``): transformers'
  ``from_pretrained`` (fp32), ``from_pretrained`` then :func:`~deltadist.core.quantized.quantize_backbone`
  (what quantizing after loading costs), and :func:`~deltadist.io.backbone_weights.load_quantized`
  (NF4 as the checkpoint is read). Peak RSS above the process's RSS after its imports, and the
  bits stored per parameter of the quantized linear weights.
* **training step** of LoRA r=8 on every projection, NF4 against fp32 weights, interleaved.
* **the built-in job** (MiniLM-L6 + LoRA, ``deltadist train``) with and without
  ``model.quantize: nf4``: eval loss and accuracy after the same steps.

Targets: the NF4 weights at most 4.5 bits per parameter; loading into NF4 peaks below half of
loading the fp32 model (the full-precision model never exists).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks.suite import ROOT, Check, Ratio, Result

BITS_TARGET = 4.5
PEAK_TARGET = 0.5
LOADERS = {"fp32": "from_pretrained (fp32)", "after": "from_pretrained, then NF4",
           "nf4": "NF4 while reading (load_quantized)"}


def load(kind: str, path: str) -> dict[str, float]:
    """Load the checkpoint at ``path`` one way: the peak of anonymous memory it adds (sampled),
    the bits stored per parameter of a block's linear weights, and the model's fp32 size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.ranks import peak_extra_rss
    from deltadist.core.quantized import quantize_backbone, storage_bits, to_nf4
    from deltadist.io.backbone_weights import load_quantized

    config = AutoConfig.from_pretrained(path)
    to_nf4(torch.zeros(64, 64))  # torchao imported, allocator and thread pools up before the baseline
    loaded: list[torch.nn.Module] = []

    def load_it() -> None:
        if kind == "nf4":
            loaded.append(load_quantized(lambda: AutoModelForCausalLM.from_config(config), path, "nf4")[0])
        else:
            loaded.append(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
            if kind == "after":
                quantize_backbone(loaded[0])

    peak = peak_extra_rss(load_it, anonymous=True)
    bits, values = storage_bits(loaded[0].model.layers[0].mlp)
    fp32 = sum(p.numel() for p in loaded[0].parameters()) * 4
    return {"peak_mib": peak / 2**20, "bits": bits / values, "fp32_mib": fp32 / 2**20}


def step_times(hidden: int, rounds: int) -> dict[str, list[float]]:
    """Interleaved LoRA training steps on the NF4 and the fp32 weights of one seeded Llama."""
    import copy

    import torch

    from benchmarks.models import PROJECTIONS, small_llama, training_batch
    from benchmarks.stepping import interleave, training_step
    from deltadist import LoraModel
    from deltadist.core.quantized import quantize_backbone

    torch.manual_seed(0)
    base = small_llama(hidden, 4)
    batch = training_batch("llama", 4, 128, 2000)
    steps = {}
    for kind in ("fp32", "nf4"):
        model = copy.deepcopy(base)
        if kind == "nf4":
            quantize_backbone(model)
        delta = LoraModel(model, modified_modules=PROJECTIONS, lora_r=8)
        delta.freeze_module()
        optimizer = torch.optim.AdamW(delta.parameters(), lr=1e-4)
        steps[kind] = training_step(model, optimizer, lambda m: m(**batch).loss, torch.device("cpu"))
    return interleave(steps, rounds, warmup=2)


def job(quantize: str, steps: int, output_dir: str) -> dict[str, float]:
    from deltadist.training.config import DEFAULT_CONFIG_PATH, load_config
    from deltadist.training.loop import train

    overrides = [f"output_dir={output_dir}", f"model.quantize={quantize}", f"training.max_steps={steps}"]
    cfg = load_config(DEFAULT_CONFIG_PATH, overrides=overrides)
    metrics = train(cfg).metrics
    return {"eval_loss": metrics.eval_loss, "accuracy": metrics.accuracy_after}


ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""glibc settings for the loading processes: big blocks mapped and freed memory returned at once.
By default glibc's mmap threshold grows as blocks are freed and later blocks come from a heap it
keeps: the same load then peaked anywhere between 275 and 546 MiB (measured), not the memory in use."""


def _in_process(*args: str) -> dict[str, Any]:
    env = {**os.environ, **ALLOCATOR} if args[0] == "load" else None
    done = subprocess.run([sys.executable, "-m", "benchmarks.qlora", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"benchmarks.qlora {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool) -> Result:
    layers, hidden, rounds, job_steps = (12, 512, 6, 16) if quick else (24, 1024, 10, 32)
    with tempfile.TemporaryDirectory() as checkpoint:
        from benchmarks.models import small_llama

        small_llama(1024, layers).save_pretrained(checkpoint)
        loads = {kind: _in_process("load", kind, checkpoint) for kind in LOADERS}
    times = _in_process("step", str(hidden), str(rounds))
    with tempfile.TemporaryDirectory() as output_dir:
        jobs = {q: _in_process("job", q, str(job_steps), output_dir) for q in ("null", "nf4")}
    step = Ratio.of(times["nf4"], times["fp32"])
    fp32_mib = loads["fp32"]["fp32_mib"]
    peak = loads["nf4"]["peak_mib"] / fp32_mib
    rows = [[LOADERS[k], f"{v['peak_mib']:,.0f} MiB", f"{v['bits']:.2f}", f"{v['peak_mib'] / fp32_mib:.2f}x"]
            for k, v in loads.items()]
    rows += [[f"LoRA step, {kind} weights", f"{Ratio.spread(times[kind]).value * 1e3:,.0f} ms", "",
              str(step) if kind == "nf4" else "1.00x"] for kind in ("fp32", "nf4")]
    rows += [[f"built-in job, {job_steps} steps, {'NF4' if q == 'nf4' else 'fp32'}",
              f"eval loss {r['eval_loss']:.4f}", "", f"accuracy {r['accuracy']:.1%}"]
             for q, r in jobs.items()]
    return Result(
        name="qlora",
        title=f"QLoRA: loading a Llama h1024 x {layers} ({fp32_mib:,.0f} MiB in fp32), a LoRA r=8 step on "
              f"h{hidden} x 4, the built-in job",
        columns=["what", "memory added / step time / loss", "bits per weight", "vs fp32 (size / time)"],
        rows=rows,
        data={"loads": loads, "step_seconds": times, "jobs": jobs},
        bars={"training step": {"NF4 / fp32": step}}, bar_label="time / same LoRA on fp32 weights",
        checks=[Check("NF4 bits per weight", loads["nf4"]["bits"], BITS_TARGET, 0.0),
                Check("NF4 load peak / fp32 model size", peak, PEAK_TARGET, 0.0)],
        notes=["Memory added: the peak of anonymous resident memory while loading (sampled at ~1 kHz), "
               "so the pages of the memory-mapped checkpoint do not count: transformers maps it, and "
               "its fp32 model adds little here (on a GPU it copies all of it to the device). The NF4 "
               "peak is the 4-bit model plus torchao's quantizer working set (~200 MiB: a chunk of 1M "
               "values compared with the 16 levels), whatever the model's size. The NF4 step dequantizes "
               "every weight in each forward and backward (torchao's NF4 tensor): its cost on a CPU."])


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "load":
        out: Any = load(*args)
    elif command == "step":
        out = step_times(int(args[0]), int(args[1]))
    else:
        out = job(args[0], int(args[1]), args[2])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
