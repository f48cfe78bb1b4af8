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
import shlex
import shutil
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
    assert out.count("eval accuracy") == 1
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
        assert output.count("eval accuracy") == 1, output[-3000:]
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
    (["--engine", "zero3"], "--engine must be ddp, fsdp2, fsdp1 or bmtrain"),
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
    # One thread per rank in both layouts: the launcher's default (cores / ranks per node) would
    # give a one-rank node two threads, and another BLAS summation order differs in the last bits.
    threads = {"OMP_NUM_THREADS": "1"}

    def launch(*args: str) -> list[str]:
        return ["bash", str(LAUNCHER), "--engine", "ddp", *args, *JOB]

    node0 = subprocess.Popen(launch("--nproc", "1", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint",
                                    endpoint, "--set", f"output_dir={tmp_path / 'two'}"),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env={**os.environ, **threads})
    try:
        check_ok(run(launch("--nproc", "1", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", endpoint,
                            "--set", f"output_dir={tmp_path / 'two'}"), env=threads))
        out, _ = node0.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        _kill_group(node0.pid)
    assert node0.returncode == 0, out[-6000:]
    check_ok(run(launch("--nproc", "2", "--set", f"output_dir={tmp_path / 'one'}"), env=threads))
    two, one = load_delta(tmp_path / "two"), load_delta(tmp_path / "one")
    assert sorted(two) == sorted(one)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=0, msg=key)


# -- dry runs of the multi-node launchers (nothing is started) ------------------------------------
BMT_LAUNCHER = REPO / "launchers" / "bmtrain.sh"
SLURM_SCRIPT = REPO / "launchers" / "slurm.sbatch"
NOT_RUN_PYTHON = """#!/usr/bin/env bash
echo "ran python $*" >&2
exit 97
"""


def script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def launch(launcher: Path, *args: str, env: dict[str, str] | None = None,
           omp: str | None = "1") -> subprocess.CompletedProcess[str]:
    """``bash launcher args`` in the repository root: stdout and stderr apart, OMP_NUM_THREADS=omp."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "RDZV_ID", "MASTER_ADDR", "MASTER_PORT", "NPROC", "ENGINE")
               and not k.startswith(("SLURM_", "DS_"))}
    environ.update(env or {})
    if omp is not None:
        environ["OMP_NUM_THREADS"] = omp
    return subprocess.run(["bash", str(launcher), *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=30)


def dry_run_argv(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """The dry run's lines, each split as the shell would; the same command shows on stderr."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"+ {lines[0]}" in result.stderr.splitlines()
    return [shlex.split(line) for line in lines]


@pytest.fixture()
def no_python(tmp_path: Path) -> dict[str, str]:
    """``PYTHON`` that fails loudly: a dry run that needs no Python must not start one."""
    return {"PYTHON": str(script(tmp_path / "python", NOT_RUN_PYTHON))}


@pytest.fixture()
def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hosts file"
    path.write_text("# DeepSpeed hostfile\nnode0 slots=8\nnode1 slots=8\n\nnode2 slots=4\n")
    return path


def test_deepspeed_hostfile_dry_run(no_python: dict[str, str], hostfile: Path) -> None:
    result = launch(DS_LAUNCHER, "--hostfile", str(hostfile), "--num-nodes", "2", "--master-addr", "node0",
                    "--master-port=29600", "--nproc", "4", "--ds-config", "configs/deepspeed/zero3.json",
                    "--dry-run", "--config", "c.yaml", "--", "--set", "training.epochs=2",
                    "--set", "output_dir=runs/a b", env=no_python)
    assert dry_run_argv(result) == [[
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--master_addr", "node0",
        "--master_port", "29600", "--num_gpus", "4", "--no_local_rank", "--module", "deltadist.cli",
        "train", "--config", "c.yaml", "--set", "engine=deepspeed",
        "--set", "deepspeed_config=configs/deepspeed/zero3.json",
        "--set", "training.epochs=2", "--set", "output_dir=runs/a b"]]
    assert "ran python" not in result.stderr
    plain = launch(DS_LAUNCHER, "--dry-run", f"--hostfile={hostfile}", env=no_python)
    assert dry_run_argv(plain) == [["deepspeed", "--hostfile", str(hostfile), "--no_local_rank", "--module",
                                    "deltadist.cli", "train", "--set", "engine=deepspeed"]]


def test_deepspeed_single_node_dry_run_is_unchanged(fake_python: dict[str, str]) -> None:
    # The fake python reports no GPU (its output is not a count): the CPU path, torchrun.
    result = launch(DS_LAUNCHER, "--nproc", "2", "--dry-run", "--", "--set", "training.epochs=2",
                    env=fake_python, omp="3")
    assert dry_run_argv(result) == [[
        "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=3", "torchrun", "--standalone", "--nproc-per-node", "2",
        "-m", "deltadist.cli", "train", "--set", "engine=deepspeed", "--set", "training.epochs=2"]]


@pytest.mark.parametrize(("args", "message"), [
    (["--hostfile", "no/such/hostfile"], "deepspeed.sh: --hostfile: no such file: no/such/hostfile"),
    (["--num-nodes", "2"], "deepspeed.sh: --num-nodes is for a multi-node job: add --hostfile FILE"),
    (["--master-addr", "node0"], "deepspeed.sh: --master-addr is for a multi-node job: add --hostfile FILE"),
    (["--hostfile", "HOSTFILE", "--num-nodes", "0"], "deepspeed.sh: --num-nodes must be a positive integer"),
    (["--hostfile", "HOSTFILE", "--master-port", "65536"],
     "deepspeed.sh: --master-port must be a port number"),
    (["--hostfile", "BADFILE"], "deepspeed.sh: --hostfile BADFILE: 'node1 gpus=8' is not 'HOST slots=N'"),
    (["--hostfile", "EMPTYFILE"], "deepspeed.sh: --hostfile EMPTYFILE lists no host"),
])
def test_deepspeed_multi_node_arguments_are_checked(no_python: dict[str, str], hostfile: Path,
                                                    args: list[str], message: str) -> None:
    bad, empty = hostfile.with_name("bad"), hostfile.with_name("empty")
    bad.write_text("node0 slots=8\nnode1 gpus=8\n")
    empty.write_text("# no hosts yet\n\n")
    files = {"HOSTFILE": str(hostfile), "BADFILE": str(bad), "EMPTYFILE": str(empty)}
    args = [files.get(a, a) for a in args]
    for name, path in files.items():
        message = message.replace(name, path)
    result = launch(DS_LAUNCHER, *args, "--dry-run", env=no_python)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(message)
    assert result.stdout == ""


def test_deepspeed_help_documents_the_hostfile() -> None:
    result = launch(DS_LAUNCHER, "--help")
    assert result.returncode == 0
    assert "deepspeed --hostfile FILE [--num_nodes M] [--master_addr A] [--master_port P]" in result.stdout
    assert "--hostfile F     DeepSpeed hostfile: one line per host, `HOST slots=GPUS`" in result.stdout


def test_torchrun_launcher_passes_bmtrain_on(no_python: dict[str, str]) -> None:
    result = launch(LAUNCHER, "--nproc", "2", "--engine", "bmtrain", "--dry-run",
                    "--set", "training.epochs=2", env=no_python)
    assert dry_run_argv(result) == [[
        "OMP_NUM_THREADS=1", "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "deltadist.cli",
        "train", "--set", "engine=bmtrain", "--set", "training.epochs=2"]]


def test_bmtrain_launcher_dry_runs_anywhere(no_python: dict[str, str]) -> None:
    single = launch(BMT_LAUNCHER, "--nproc", "8", "--config", "c.yaml", "--dry-run", env=no_python, omp="2")
    assert dry_run_argv(single) == [[
        "OMP_NUM_THREADS=2", "torchrun", "--standalone", "--nproc-per-node", "8", "-m", "deltadist.cli",
        "train", "--config", "c.yaml", "--set", "engine=bmtrain"]]
    multi = launch(BMT_LAUNCHER, "--dry-run", "--nproc", "4", "--nnodes", "2", "--node-rank", "1",
                   "--rdzv-endpoint", "node0:29400", "--set", "training.epochs=2",
                   env={**no_python, "RDZV_ID": "job9"})
    assert dry_run_argv(multi) == [[
        "OMP_NUM_THREADS=1", "torchrun", "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job9", "--nproc-per-node", "4", "-m",
        "deltadist.cli", "train", "--set", "engine=bmtrain", "--set", "training.epochs=2"]]


def test_bmtrain_launcher_needs_cuda_and_its_own_engine(tmp_path: Path, no_python: dict[str, str]) -> None:
    no_cuda = script(tmp_path / "no_cuda_python", '#!/usr/bin/env bash\n[[ "$1" == -c ]] && echo False\n')
    result = launch(BMT_LAUNCHER, "--nproc", "2", env={"PYTHON": str(no_cuda)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("bmtrain.sh: BMTrain needs CUDA GPUs and torch sees none here; add --dry-run "
                             "to print the command\n")
    other = launch(BMT_LAUNCHER, "--engine", "ddp", "--dry-run", env=no_python)
    assert other.returncode == 2 and "use launchers/torchrun.sh --engine" in other.stderr
    # With CUDA it runs torchrun.sh --engine bmtrain: the fake python prints what it was given.
    cuda = script(tmp_path / "cuda_python",
                  '#!/usr/bin/env bash\nif [[ "$1" == -c ]]; then echo True; else printf "%s\\n" "$@"; fi\n')
    ran = launch(BMT_LAUNCHER, "--nproc", "2", env={"PYTHON": str(cuda)})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                       "-m", "deltadist.cli", "train", "--set", "engine=bmtrain"]


SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
             "SLURM_NODEID": "1", "SLURM_SUBMIT_DIR": str(REPO)}
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" && "$3" == "gpu[07-08]" ]] || { echo "unexpected: $*" >&2; exit 1; }
printf 'gpu07\\ngpu08\\n'
"""


@pytest.fixture()
def fake_slurm_bin(tmp_path: Path) -> dict[str, str]:
    """A PATH whose ``scontrol`` expands ``gpu[07-08]``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script(bin_dir / "scontrol", FAKE_SCONTROL)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_slurm_dry_run_prints_srun_and_the_node_command(no_python: dict[str, str],
                                                        fake_slurm_bin: dict[str, str]) -> None:
    result = launch(SLURM_SCRIPT, "--nproc", "4", "--engine", "fsdp2", "--dry-run", "--",
                    "--config", "configs/minilm_lora.yaml", "--set", "output_dir=runs/it's",
                    env={**no_python, **fake_slurm_bin, **SLURM_JOB, "SLURM_CPUS_PER_TASK": "16"})
    launcher = str(REPO / "launchers" / "torchrun.sh")
    node = ["--nnodes", "2", "--rdzv-endpoint", "gpu07:29500", "--nproc", "4", "--engine", "fsdp2",
            "--config", "configs/minilm_lora.yaml", "--set", "output_dir=runs/it's"]
    assert dry_run_argv(result) == [
        ["MASTER_ADDR=gpu07", "MASTER_PORT=29500", "RDZV_ID=deltadist-4242",
         "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
         "--cpus-per-task=16",
         "bash", "-c", 'exec bash "$0" --node-rank "$SLURM_NODEID" "$@"', launcher, *node],
        ["bash", launcher, "--node-rank", "1", *node],
    ]


def test_slurm_dry_run_takes_the_environment(no_python: dict[str, str]) -> None:
    # MASTER_ADDR, MASTER_PORT, RDZV_ID, NPROC and ENGINE as set; no scontrol needed.
    result = launch(SLURM_SCRIPT, "--dry-run", "--set", "training.epochs=2",
                    env={**no_python, **SLURM_JOB, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31000",
                         "RDZV_ID": "mine", "NPROC": "2", "ENGINE": "bmtrain", "SLURM_NODEID": "0"})
    node = ["--nnodes", "2", "--rdzv-endpoint", "10.1.2.3:31000", "--nproc", "2", "--engine", "bmtrain",
            "--set", "training.epochs=2"]
    srun, per_node = dry_run_argv(result)
    assert srun[:4] == ["MASTER_ADDR=10.1.2.3", "MASTER_PORT=31000", "RDZV_ID=mine", "srun"]
    assert srun[-len(node):] == node
    assert per_node == ["bash", str(REPO / "launchers" / "torchrun.sh"), "--node-rank", "0", *node]


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="scontrol is installed here")
def test_slurm_dry_run_without_scontrol_takes_the_first_listed_host(no_python: dict[str, str]) -> None:
    result = launch(SLURM_SCRIPT, "--dry-run",
                    env={**no_python, **SLURM_JOB, "SLURM_JOB_NODELIST": "nodeA,nodeB"})
    srun, per_node = dry_run_argv(result)
    assert srun[0] == "MASTER_ADDR=nodeA"
    assert per_node[4:] == ["--nnodes", "2", "--rdzv-endpoint", "nodeA:29500"]
    assert ("no scontrol here: MASTER_ADDR=nodeA, the first name of SLURM_JOB_NODELIST=nodeA,nodeB"
            in result.stderr)
    bracketed = launch(SLURM_SCRIPT, "--dry-run", env={**no_python, **SLURM_JOB})
    assert bracketed.returncode == 2
    assert bracketed.stderr == ("slurm.sbatch: no scontrol to expand SLURM_JOB_NODELIST=gpu[07-08]: set "
                                "MASTER_ADDR to its first host\n")


@pytest.mark.parametrize(("env", "args", "message"), [
    ({}, [], "slurm.sbatch: not in a SLURM job (SLURM_JOB_NODELIST, SLURM_NNODES unset)"),
    (SLURM_JOB, ["--engine", "deepspeed"], "launchers/deepspeed.sh --hostfile FILE"),
    ({**SLURM_JOB, "ENGINE": "plain"}, [], "slurm.sbatch: --engine must be ddp, fsdp2, fsdp1 or bmtrain"),
    (SLURM_JOB, ["--nproc", "x"], "slurm.sbatch: --nproc must be a positive integer"),
    ({**SLURM_JOB, "MASTER_ADDR": "h", "MASTER_PORT": "0"}, [], "slurm.sbatch: MASTER_PORT must be a port"),
])
def test_slurm_script_checks_its_inputs(no_python: dict[str, str], env: dict[str, str], args: list[str],
                                        message: str) -> None:
    result = launch(SLURM_SCRIPT, *args, "--dry-run", env={**no_python, **env})
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


FAKE_SRUN = """#!/usr/bin/env bash
# Run the task once per node, one after the other, as srun would on each: SLURM_NODEID=0..ntasks-1.
ntasks=1
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks=* ]] && ntasks=${1#*=}; shift; done
for ((node = 0; node < ntasks; node++)); do SLURM_NODEID=$node SLURM_STEP_ID=0 "$@" || exit; done
"""


def test_slurm_script_starts_one_launcher_per_node(tmp_path: Path, fake_python: dict[str, str],
                                                   fake_slurm_bin: dict[str, str]) -> None:
    """Not a dry run: a fake srun runs the per-node command for nodes 0 and 1, and torchrun.sh hands the
    fake python each node's torchrun arguments."""
    script(Path(fake_slurm_bin["PATH"].split(os.pathsep)[0]) / "srun", FAKE_SRUN)
    result = launch(SLURM_SCRIPT, "--nproc", "2", "--", "--set", "output_dir=runs/a b",
                    env={**fake_python, **fake_slurm_bin, **SLURM_JOB}, omp="1")
    assert result.returncode == 0, result.stderr

    def node(rank: str) -> list[str]:
        return ["OMP_NUM_THREADS=1", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", rank,
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu07:29500", "--rdzv-id", "deltadist-4242",
                "--nproc-per-node", "2", "-m", "deltadist.cli", "train", "--set", "engine=ddp",
                "--set", "output_dir=runs/a b"]

    assert result.stdout.splitlines() == node("0") + node("1")


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["slurm", "openmpi"])
def test_ranks_started_by_srun_or_mpirun_form_the_process_group(launcher: str) -> None:
    """Two processes with only srun's (or mpirun's) variables and MASTER_ADDR/MASTER_PORT: setup_engine
    joins them into one gloo group (an all-reduce of the ranks) and exports torchrun's variables."""
    code = (
        "import os, torch, torch.distributed as dist\n"
        "from deltadist.engines import setup_engine\n"
        "setup = setup_engine('ddp')\n"
        "total = torch.tensor([setup.rank + 1.0]); dist.all_reduce(total)\n"
        "print(setup.rank, setup.world_size, int(total), os.environ['RANK'], os.environ['LOCAL_RANK'])\n"
        "setup.close()\n"
    )
    port = str(_free_port())
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    procs = []
    for rank in range(2):
        if launcher == "slurm":
            place = {"SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
                     "SLURM_LOCALID": str(rank)}
        else:
            place = {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
                     "OMPI_COMM_WORLD_LOCAL_RANK": str(rank)}
        env = {**clean, **place, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-4000:]
            outputs.append(out.strip().splitlines()[-1])
    finally:
        for proc in procs:
            _kill_group(proc.pid)
    assert outputs == ["0 2 3 0 0", "1 2 3 1 1"]
