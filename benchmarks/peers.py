"""Peers that cannot share deltadist's environment (their pins clash with it): each gets its own
virtual environment under ``benchmarks/.venvs/`` (made on first use: torch from the same pinned
wheel, then the peer), and its runs step in a worker process (:mod:`benchmarks.peer_worker`) that
the benchmark interleaves with its own runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.suite import ROOT

VENVS = Path(__file__).parent / ".venvs"
PEERS: dict[str, dict[str, Any]] = {
    "adapters": {"label": "AdapterHub", "packages": ["adapters"], "env": {}},
    # OpenDelta 0.3.2, the last release, imports transformers.deepspeed (gone after 4.39) and
    # pkg_resources (gone from setuptools 81), and requires the deprecated `sklearn` dummy package,
    # which refuses to install unless told to.
    "opendelta": {"label": "OpenDelta 0.3.2",
                  "packages": ["opendelta==0.3.2", "transformers==4.39.3", "setuptools<81"],
                  "env": {"SKLEARN_ALLOW_DEPRECATED_SKLEARN_PACKAGE_INSTALL": "True"}},
}


def environment(peer: str) -> Path | str:
    """The peer's Python, made if missing; or why it could not be made (one line)."""
    venv = VENVS / peer
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists():
        return python
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    env = {**os.environ, **PEERS[peer]["env"]}
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "-q", torch_pin],
             [str(python), "-m", "pip", "install", "-q", torch_pin, *PEERS[peer]["packages"]]]
    print(f"    making {venv} for {PEERS[peer]['label']} (once) ...", flush=True)
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            lines = [line for line in (done.stderr + done.stdout).splitlines()
                     if line.strip() and "WARNING: Location" not in line]
            packages = " ".join(PEERS[peer]["packages"])
            return f"could not install {packages}: " + (lines[-1] if lines else "failed")
    marker.write_text("ok\n")
    return python


class PeerRun:
    """A training step of ``method`` in ``peer``'s worker process; calling it runs one step and
    returns its seconds (as the worker timed it)."""

    def __init__(self, python: Path, spec: dict[str, Any]) -> None:
        # PASSIVE: the worker's OpenMP threads sleep once its step is done instead of spinning for
        # a while, which would take the cores from the run timed next.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error",
               "OMP_WAIT_POLICY": "PASSIVE"}
        command = [str(python), "-m", "benchmarks.peer_worker", json.dumps(spec)]
        self.label = f"{spec.get('peer', 'adapters')} {spec.get('task', 'step')} of {spec['method']}"
        self.process = subprocess.Popen(command, cwd=ROOT,
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        answer = self.process.stdout.readline().strip()
        self.error = None if answer == "ready" else (answer.removeprefix("error: ") or "the worker died")
        if self.error:
            self.close()

    def __call__(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"a peer worker ({self.label}) ended during a step, exit code "
                               f"{self.process.wait()}")
        return float(answer)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                pass
            self.process.wait(timeout=30)
