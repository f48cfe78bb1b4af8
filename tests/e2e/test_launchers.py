"""The launchers end to end: ``torchrun.sh`` (DDP, FSDP2, FSDP1) and ``deepspeed.sh`` (ZeRO-2,
ZeRO-3) on 2 CPU ranks train the same delta as one process.

The job is the main one, shrunk (64 train / 32 test sentences, global batch 16: 4 steps, each rank
taking 8 rows) with dropout off, so the runs are comparable value for value. Every command runs in
its own session under a deadline; on a timeout or a failure its whole process group (torchrun and
its ranks) is killed, so nothing outlives the test.

The first test launches 6 jobs (plain, then one launch per engine or ZeRO stage): about 90 s on 2 cores.
It is one test so that ``pytest -n 2`` never runs the shared single-process reference twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launchers" / "torchrun.sh"
DS_LAUNCHER = REPO / "launchers" / "deepspeed.sh"
ENGINES = ("ddp", "fsdp2", "fsdp1")
ZERO_STAGES = ("zero2", "zero3")
LR = 0.002  # training.lr of configs/minilm_lora.yaml
JOB = [
    "--config", "configs/minilm_lora.yaml",
    "--set", "data.train_size=64", "--set", "data.test_size=32", "--set", "training.batch_size=16",
    "--set", "training.epochs=1", "--set", "model.dropout=0",
]
LAUNCH_TIMEOUT_S = 180


def run(cmd: list[str], timeout: float = LAUNCH_TIMEOUT_S,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the repository root in a new session; kill its process group if it fails.

    ``subprocess.run(timeout=...)`` would kill only torchrun, not the ranks it started: the group
    is killed here instead. Output (stdout and stderr together) is returned.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s; output tail:\n{out[-6000:]}")
    except BaseException:
        _kill_group(proc.pid)
        proc.communicate()
        raise
    if proc.returncode != 0:
        _kill_group(proc.pid)  # a rank left behind by a failed launch
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited with {result.returncode}; output tail:\n{result.stdout[-6000:]}"
    )
    return result.stdout


def _delta_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "delta" / "delta_config.json").read_text())


def load_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "delta" / "delta.safetensors"))


@pytest.mark.distributed
@pytest.mark.slow
def test_launchers_train_the_single_process_delta(tmp_path: Path) -> None:
    out = check_ok(run([sys.executable, "-m", "deltadist.cli", "train", *JOB,
                        "--set", "engine=plain", "--set", f"output_dir={tmp_path / 'plain'}"]))
    assert out.count("test accuracy") == 1
    outputs = {
        engine: check_ok(run(["bash", str(LAUNCHER), "--nproc", "2", "--engine", engine, *JOB,
                              "--set", f"output_dir={tmp_path / engine}"]))
        for engine in ENGINES
    }
    outputs.update({
        stage: check_ok(run(["bash", str(DS_LAUNCHER), "--nproc", "2", "--ds-config",
                             str(REPO / "configs" / "deepspeed" / f"{stage}.json"), "--", *JOB,
                             "--set", f"output_dir={tmp_path / stage}"]))
        for stage in ZERO_STAGES
    })

    plain_metrics = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert (plain_metrics["engine"], plain_metrics["world_size"]) == ("plain", 1)
    plain = load_delta(tmp_path / "plain")
    deltas = {}
    for engine, output in outputs.items():
        metrics = json.loads((tmp_path / engine / "metrics.json").read_text())
        expected_engine = "deepspeed" if engine in ZERO_STAGES else engine
        assert (metrics["engine"], metrics["world_size"]) == (expected_engine, 2)
        assert metrics["trainable_params"] == plain_metrics["trainable_params"]
        assert metrics["total_params"] == plain_metrics["total_params"]  # logical, not a shard's
        # Only rank 0 reports: one parameter table, one summary.
        assert output.count("LoraModel on TextClassifier") == 1, output[-3000:]
        assert output.count("test accuracy") == 1, output[-3000:]
        # Every rank evaluated the whole test set; one differently rounded logit may flip a tie.
        assert abs(metrics["accuracy_after"] - plain_metrics["accuracy_after"]) <= 1 / 32
        assert metrics["accuracy_before"] == plain_metrics["accuracy_before"]

        # The backbone fingerprint, sampled from shards without gathering, is the one process's.
        hashes = [_delta_config(tmp_path / d)["backbone_hash"] for d in (engine, "plain")]
        assert hashes[0] == hashes[1], engine

        deltas[engine] = delta = load_delta(tmp_path / engine)
        assert sorted(delta) == sorted(plain), engine
        # Each rank's gradient sums 8 rows and the ranks' gradients are averaged; one process sums
        # 16: the same gradient up to fp32 summation order (~1e-7 relative). AdamW's update
        # m/(sqrt(v)+eps) is very sensitive exactly where a gradient element is below eps=1e-8:
        # there d(update)/d(grad) = lr/eps, so a 1e-9 rounding difference moves the element by
        # up to ~0.1*lr. Measured (torch 2.13 CPU, this job): 3 of 75,268 values (layer 3 query
        # lora_A/B, whose step-2 gradients are ~8e-9 while that tensor's median is 2e-5) differ
        # by up to 1.8e-4 = 0.09*lr; every other value is within rtol=1e-4, atol=1e-5. So: all
        # values within one AdamW step (lr) of the single-process ones, and all but 0.1% within
        # rtol=1e-4, atol=1e-5. The engines among themselves are held to the strict tolerance below.
        total = outside = 0
        for key, want in plain.items():
            got = delta[key]
            assert got.shape == want.shape, key
            torch.testing.assert_close(got, want, rtol=0, atol=LR, msg=lambda m: f"{engine} {key}: {m}")
            outside += int(((got - want).abs() > 1e-5 + 1e-4 * want.abs()).sum())
            total += want.numel()
        assert outside <= total // 1000, (
            f"{engine}: {outside} of {total} values differ beyond rtol=1e-4, atol=1e-5")

    # The three engines compute the same per-rank sums and averages: measured bit-identical.
    for engine in ENGINES[1:]:
        for key, want in deltas["ddp"].items():
            torch.testing.assert_close(deltas[engine][key], want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{engine} vs ddp, {key}: {m}")


# -- the launcher's command line, without starting anything ------------------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
printf '%s\\n' "$@"
"""


@pytest.fixture()
def fake_python(tmp_path: Path) -> dict[str, str]:
    """``PYTHON`` for the launcher: prints the thread setting and its arguments, one a line."""
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return {"PYTHON": str(path)}


def launcher_argv(env: dict[str, str], *args: str, omp: str | None = None) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    environ.update(env)
    if omp is not None:
        environ["OMP_NUM_THREADS"] = omp
    result = subprocess.run(["bash", str(LAUNCHER), *args], cwd=REPO, env=environ, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_launcher_builds_the_torchrun_command(fake_python: dict[str, str]) -> None:
    lines = launcher_argv(fake_python, "--nproc", "2", "--engine", "fsdp2", "--config", "c.yaml",
                          "--set", "training.epochs=2")
    cores = os.cpu_count() or 1
    assert lines == [
        f"OMP_NUM_THREADS={max(1, cores // 2)}",
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "deltadist.cli",
        "train", "--config", "c.yaml", "--set", "engine=fsdp2", "--set", "training.epochs=2",
    ]


def test_launcher_defaults(fake_python: dict[str, str]) -> None:
    # No --engine: the config's engine; neither --engine nor --config: ddp. OMP_NUM_THREADS is kept.
    assert launcher_argv(fake_python, "--nproc=3", "--config=x.yaml", omp="5")[0] == "OMP_NUM_THREADS=5"
    assert launcher_argv(fake_python, "--nproc=3", "--config=x.yaml")[-3:] == ["train", "--config", "x.yaml"]
    assert launcher_argv(fake_python, "--nproc", "3")[-3:] == ["train", "--set", "engine=ddp"]


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "plain"], "engine plain runs one process"),
    (["--engine", "zero3"], "--engine must be ddp, fsdp2 or fsdp1"),
    (["--nproc", "0"], "--nproc must be a positive integer"),
    (["--nproc"], "--nproc needs a value"),
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank must be 0..1"),
])
def test_launcher_rejects_bad_arguments(fake_python: dict[str, str], args: list[str], message: str) -> None:
    result = subprocess.run(["bash", str(LAUNCHER), "--nproc", "2", *args], cwd=REPO,
                            env={**os.environ, **fake_python}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_launcher_help_documents_the_command() -> None:
    result = subprocess.run(["bash", str(LAUNCHER), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "torchrun --standalone --nproc-per-node N -m deltadist.cli train" in result.stdout


def test_dry_run_prints_the_multi_node_command_and_starts_nothing(fake_python: dict[str, str]) -> None:
    lines = launcher_argv({**fake_python, "RDZV_ID": "job7"}, "--nproc", "4", "--nnodes", "2",
                          "--node-rank", "1", "--rdzv-endpoint", "10.0.0.1:29400", "--dry-run",
                          "--set", "training.epochs=2", omp="3")
    assert lines == [  # one line: the fake python (which would print its arguments) never ran
        "OMP_NUM_THREADS=3 torchrun --nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint "
        "10.0.0.1:29400 --rdzv-id job7 --nproc-per-node 4 -m deltadist.cli train --set engine=ddp "
        "--set training.epochs=2"]
    single = launcher_argv(fake_python, "--nproc", "2", "--dry-run", omp="1")
    assert single == ["OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m deltadist.cli train "
                      "--set engine=ddp"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_train_the_delta_one_node_trains(tmp_path: Path) -> None:
    """Two launcher invocations on 127.0.0.1 with --nnodes 2 (one rank each) meet at a c10d
    rendezvous and train exactly what one node with two ranks trains."""
    endpoint = f"127.0.0.1:{_free_port()}"

    def launch(*args: str) -> list[str]:
        return ["bash", str(LAUNCHER), "--engine", "ddp", *args, *JOB]

    node0 = subprocess.Popen(launch("--nproc", "1", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint",
                                    endpoint, "--set", f"output_dir={tmp_path / 'two'}"),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        check_ok(run(launch("--nproc", "1", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", endpoint,
                            "--set", f"output_dir={tmp_path / 'two'}")))
        out, _ = node0.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        _kill_group(node0.pid)
    assert node0.returncode == 0, out[-6000:]
    check_ok(run(launch("--nproc", "2", "--set", f"output_dir={tmp_path / 'one'}")))
    two, one = load_delta(tmp_path / "two"), load_delta(tmp_path / "one")
    assert sorted(two) == sorted(one)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=0, msg=key)
