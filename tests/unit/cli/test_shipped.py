"""``deltadist configs`` and ``deltadist launch``: the example configs and launcher scripts that ship
inside the package are the checkout's ``configs/`` and ``launchers/``, listed, printed, copied and run
from any directory (in-process through ``main`` and as a command). The wheel itself:
tests/e2e/test_wheel.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deltadist.cli.main import main
from deltadist.training.config import load_config

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted(str(path.relative_to(REPO / "configs")) for path in (REPO / "configs").rglob("*")
                  if path.is_file())


def _command(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m deltadist.cli ARGV`` run in ``cwd`` (this checkout on PYTHONPATH)."""
    return subprocess.run([sys.executable, "-m", "deltadist.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def _main_in_child(argv: list[str], cwd: Path, out: Path) -> tuple[int, str, str]:
    """``main(argv)`` in a forked child (``deltadist launch`` replaces its process with bash): its exit
    status, stdout and stderr."""
    stdout, stderr = out / "stdout", out / "stderr"
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 70
        try:
            os.chdir(cwd)
            for fd, path in ((1, stdout), (2, stderr)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            code = main(argv)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stdout.read_text(), stderr.read_text()


def _one_error(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deltadist {command}: error: "), err
    return lines[0]


def test_configs_lists_every_example_of_the_checkout_with_its_description(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == EXAMPLES
    described = dict(line.split(None, 1) for line in lines)
    assert described["minilm_lora.yaml"] == ("deltadist train: LoRA on all-MiniLM-L6-v2 for 4-topic sentence "
                                             "classification.")  # the file's first comment line
    assert described["deepspeed/zero3.json"].startswith("ZeRO-3: parameters, gradients and optimizer state")


@pytest.mark.parametrize("name, file", [("minilm_lora_ddp", "minilm_lora_ddp.yaml"),
                                        ("deepspeed/zero3.json", "deepspeed/zero3.json")])
def test_configs_name_prints_the_example(name: str, file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", name]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / file).read_text()


def test_configs_out_copies_a_working_job_with_the_example_it_includes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "jobs" / "adapter.yaml"
    assert main(["configs", "minilm_adapter", "--out", str(out)]) == 0
    assert out.read_text() == (REPO / "configs" / "minilm_adapter.yaml").read_text()
    base = (REPO / "configs" / "minilm_lora.yaml").read_text()
    assert (out.parent / "minilm_lora.yaml").read_text() == base
    assert load_config(out) == load_config(REPO / "configs" / "minilm_adapter.yaml")
    assert f"wrote {out}, {out.parent / 'minilm_lora.yaml'}" in capsys.readouterr().err
    # A second example beside it shares the include it finds there unchanged.
    assert main(["configs", "minilm_bitfit", "--out", str(out.parent / "bitfit.yaml")]) == 0
    assert load_config(out.parent / "bitfit.yaml") == load_config(REPO / "configs" / "minilm_bitfit.yaml")


def test_configs_out_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job.yaml"
    out.write_text("mine: 1\n")
    assert main(["configs", "minilm_lora", "--out", str(out)]) == 2
    line = _one_error(capsys.readouterr().err, "configs")
    assert line.endswith(f"{out} exists; remove it or pick another --out.")
    assert out.read_text() == "mine: 1\n"
    # An include of another content in the way: nothing is written.
    (tmp_path / "minilm_lora.yaml").write_text("mine: 2\n")
    assert main(["configs", "minilm_prefix", "--out", str(tmp_path / "prefix.yaml")]) == 2
    assert "is not the example minilm_prefix.yaml includes" in _one_error(capsys.readouterr().err, "configs")
    assert not (tmp_path / "prefix.yaml").exists()
    assert (tmp_path / "minilm_lora.yaml").read_text() == "mine: 2\n"


@pytest.mark.parametrize("argv, problem", [
    (["configs", "minilm_ddp"], "no example config named 'minilm_ddp'; `deltadist configs` lists them"),
    (["configs", "--out", "x.yaml"], "--out needs the NAME of the example to copy"),
])
def test_configs_bad_input_is_one_line(argv: list[str], problem: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert problem in _one_error(capsys.readouterr().err, "configs")


def test_configs_as_a_command_outside_the_checkout(tmp_path: Path) -> None:
    result = _command(["configs", "minilm_lora_fsdp2"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (REPO / "configs" / "minilm_lora_fsdp2.yaml").read_text()


LAUNCH = ["--nproc", "2", "--config", "job.yaml", "--dry-run", "--set", "training.epochs=1"]


def test_launch_dry_run_as_a_command_outside_the_checkout(tmp_path: Path) -> None:
    """``deltadist launch torchrun ...`` prints what ``bash launchers/torchrun.sh ...`` prints."""
    result = _command(["launch", "torchrun", *LAUNCH], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("torchrun --standalone --nproc-per-node 2 -m deltadist.cli train --config "
                                  "job.yaml --set training.epochs=1\n")
    script = subprocess.run(["bash", str(REPO / "launchers" / "torchrun.sh"), *LAUNCH], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (script.returncode, script.stdout)


@pytest.mark.parametrize("script, argv, env, expected", [
    ("deepspeed.sh", ["--nproc", "2", "--ds-config", "zero2.json", "--dry-run", "--", "--set", "x=1"],
     {}, "torchrun --standalone --nproc-per-node 2 -m deltadist.cli train --set engine=deepspeed "
         "--set deepspeed_config=zero2.json --set x=1\n"),
    ("bmtrain.sh", ["--nproc", "2", "--dry-run"], {},
     "torchrun --standalone --nproc-per-node 2 -m deltadist.cli train --set engine=bmtrain\n"),
    ("slurm.sbatch", ["--nproc", "4", "--engine", "fsdp2", "--dry-run"],
     {"SLURM_JOB_NODELIST": "node0,node1", "SLURM_NNODES": "2", "SLURM_NODEID": "1"},
     "launchers/torchrun.sh --node-rank 1 --nnodes 2 --rdzv-endpoint node0:29500 --nproc 4 --engine fsdp2\n"),
])
def test_launch_dry_run_in_process_is_the_script_s(script: str, argv: list[str], env: dict[str, str],
                                                    expected: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``main(["launch", NAME, ...])`` runs the shipped script: its dry run's command, as the script
    in ``launchers/`` prints it (which finds torchrun.sh beside itself there)."""
    shutil.copy(REPO / "configs" / "deepspeed" / "zero2.json", tmp_path)  # deepspeed.sh checks it exists
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = _main_in_child(["launch", script.partition(".")[0], *argv], tmp_path, tmp_path)
    assert code == 0, err
    assert out.endswith(expected)
    if script != "deepspeed.sh":  # (deepspeed.sh imports torch to count GPUs: one run is enough)
        direct = subprocess.run(["bash", str(REPO / "launchers" / script), *argv], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert out == direct.stdout.replace(str(REPO / "launchers"), str(REPO / "deltadist" / "launchers"))


def test_launch_passes_the_script_s_errors_and_exit_status(tmp_path: Path) -> None:
    code, out, err = _main_in_child(["launch", "torchrun", "--nproc", "0"], tmp_path, tmp_path)
    assert (code, out, err) == (2, "", "torchrun.sh: --nproc must be a positive integer, got '0'\n")


def test_launch_unknown_launcher_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "mpirun", "--dry-run"])
    assert exit_.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]  # after argparse's usage line
    assert line.startswith("deltadist launch: error: argument LAUNCHER: invalid choice: 'mpirun'"), line
    assert all(name in line for name in ("bmtrain", "deepspeed", "slurm", "torchrun"))


def test_train_help_points_at_the_installed_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("Start a distributed engine on N ranks with deltadist launch torchrun --nproc N --engine "
            "ddp|fsdp2|fsdp1 [--config PATH] [--set ...], deltadist launch deepspeed or deltadist launch "
            "bmtrain") in out
    assert "Example configs to start from: deltadist configs." in out
    assert "launchers/" not in out and "configs/" not in out  # no path into a checkout
