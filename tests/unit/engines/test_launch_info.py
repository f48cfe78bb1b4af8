"""Where ``deltadist train`` learns its place in a launched world: torchrun / the DeepSpeed launcher,
Open MPI, MPICH / Intel MPI and SLURM's srun, in that order of precedence, and the rendezvous
(``MASTER_ADDR``, ``MASTER_PORT``) the ones after torchrun need. No process is started; a world of
one is initialised in this process where a test says so.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist

from deltadist.engines import setup_engine
from deltadist.engines.runtime import LaunchInfo, launch_info
from deltadist.errors import ConfigError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
MPICH = {"PMI_RANK": "4", "PMI_SIZE": "8", "MPI_LOCALRANKID": "0"}
INTEL_MPI_PMI = {"PMI_RANK": "6", "PMI_SIZE": "8", "PMI_LOCAL_RANK": "3"}
SRUN = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "7", "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "3", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-10]"}
# What an sbatch script itself sees (no SLURM_STEP_ID): it is not one of the job's tasks.
BATCH_SCRIPT = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0",
                "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[07-10]"}
RENDEZVOUS = {"MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}


def place(info: LaunchInfo | None) -> tuple[int, int, int, str] | None:
    return None if info is None else (info.rank, info.world_size, info.local_rank, info.source)


@pytest.mark.parametrize(("env", "expected"), [
    (TORCHRUN, (3, 8, 1, "torchrun")),
    (OPENMPI, (5, 6, 2, "openmpi")),
    (MPICH, (4, 8, 0, "mpich")),
    (INTEL_MPI_PMI, (6, 8, 3, "mpich")),
    ({**MPICH, "PMI_LOCAL_RANK": "5"}, (4, 8, 0, "mpich")),  # MPI_LOCALRANKID first
    (SRUN, (7, 16, 3, "slurm")),
    ({**SRUN, **RENDEZVOUS}, (7, 16, 3, "slurm")),
])
def test_each_launcher_is_read(env: dict[str, str], expected: tuple[int, int, int, str]) -> None:
    assert place(launch_info(env)) == expected


@pytest.mark.parametrize("env", [{}, BATCH_SCRIPT, RENDEZVOUS, {"LOCAL_RANK": "0"}])
def test_no_launcher_no_world(env: dict[str, str]) -> None:
    assert launch_info(env) is None


@pytest.mark.parametrize(("env", "expected"), [
    ({**SRUN, **TORCHRUN}, (3, 8, 1, "torchrun")),  # torchrun started by srun in an sbatch job
    ({**BATCH_SCRIPT, **TORCHRUN}, (3, 8, 1, "torchrun")),
    ({**OPENMPI, **TORCHRUN}, (3, 8, 1, "torchrun")),
    ({**SRUN, **OPENMPI}, (5, 6, 2, "openmpi")),  # mpirun inside a SLURM step
    ({**SRUN, **MPICH}, (4, 8, 0, "mpich")),  # srun --mpi=pmi2 sets PMI_* too
    ({**MPICH, **OPENMPI}, (5, 6, 2, "openmpi")),
])
def test_precedence_torchrun_then_mpi_then_slurm(env: dict[str, str],
                                                 expected: tuple[int, int, int, str]) -> None:
    assert place(launch_info(env)) == expected


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "2", "RANK": "1"},
     r"WORLD_SIZE is set, so this looks like a launch by torchrun or the DeepSpeed launcher, but "
     r"RANK=1, WORLD_SIZE=2, LOCAL_RANK=<unset>"),
    ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "five"},
     r"OMPI_COMM_WORLD_SIZE is set, so this looks like a launch by Open MPI's mpirun, but "
     r"OMPI_COMM_WORLD_RANK=five, OMPI_COMM_WORLD_SIZE=6, OMPI_COMM_WORLD_LOCAL_RANK=2"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"},
     r"MPICH / Intel MPI \(PMI\), but PMI_RANK=0, PMI_SIZE=2, MPI_LOCALRANKID=<unset>, "
     r"PMI_LOCAL_RANK=<unset>; it sets PMI_RANK, PMI_SIZE and MPI_LOCALRANKID or PMI_LOCAL_RANK"),
    ({**SRUN, "SLURM_NTASKS": "2(x4)"},
     r"SLURM_STEP_ID is set, so this looks like a launch by SLURM's srun, but SLURM_PROCID=7, "
     r"SLURM_NTASKS=2\(x4\), SLURM_LOCALID=3.*Unset SLURM_STEP_ID for a single process"),
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, r"SLURM_PROCID=<unset>"),
])
def test_malformed_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        launch_info(env)
    if "WORLD_SIZE" not in env:
        assert "torchrun" not in str(error.value)


@pytest.mark.parametrize(("env", "message"), [
    ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "6"},
     r"Inconsistent launch variables from Open MPI's mpirun: OMPI_COMM_WORLD_RANK=6, "
     r"OMPI_COMM_WORLD_SIZE=6, OMPI_COMM_WORLD_LOCAL_RANK=2: needs 0 <= OMPI_COMM_WORLD_RANK < "
     r"OMPI_COMM_WORLD_SIZE"),
    ({**SRUN, "SLURM_NTASKS": "0", "SLURM_PROCID": "0"},
     r"from SLURM's srun: SLURM_PROCID=0, SLURM_NTASKS=0"),
    ({**INTEL_MPI_PMI, "PMI_LOCAL_RANK": "-1"}, r"from MPICH / Intel MPI \(PMI\).*PMI_LOCAL_RANK >= 0"),
    ({**TORCHRUN, "RANK": "-1"}, r"from torchrun or the DeepSpeed launcher: RANK=-1, WORLD_SIZE=8"),
])
def test_inconsistent_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        launch_info(env)


@pytest.mark.parametrize(("env", "missing", "fix"), [
    (SRUN, "MASTER_ADDR and MASTER_PORT are not set",
     r'export MASTER_ADDR=\$\(scontrol show hostnames "\$SLURM_JOB_NODELIST" \| head -n 1\) '
     r"MASTER_PORT=29500"),
    ({**SRUN, "MASTER_ADDR": "gpu07"}, "MASTER_PORT is not set", "deltadist launch slurm"),
    ({**OPENMPI, "MASTER_PORT": "29500"}, "MASTER_ADDR is not set",
     r"mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500"),
    ({**MPICH, "MASTER_ADDR": ""}, "MASTER_ADDR and MASTER_PORT are not set",
     r"mpiexec -genv MASTER_ADDR <first host> -genv MASTER_PORT 29500"),
])
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_world_after_srun_or_mpirun_needs_master_addr_and_port(
        env: dict[str, str], missing: str, fix: str, engine: str) -> None:
    with pytest.raises(ConfigError, match=rf"MASTER_ADDR:MASTER_PORT, but {missing}\..*{fix}"):
        setup_engine(engine, env)
    assert not dist.is_initialized()


def test_the_missing_rendezvous_error_names_the_source_and_the_place() -> None:
    with pytest.raises(ConfigError) as error:
        setup_engine("ddp", SRUN)
    assert str(error.value).startswith("This process was started by SLURM's srun (SLURM_PROCID=7, "
                                       "SLURM_NTASKS=16): the process group meets at MASTER_ADDR:MASTER_PORT")
    assert "torchrun" not in str(error.value)


@pytest.mark.parametrize("port", ["http", "0", "70000", "-1"])
def test_a_bad_master_port_is_an_error(port: str) -> None:
    with pytest.raises(ConfigError, match=rf"MASTER_PORT={port} \(with MASTER_ADDR=gpu07, from Open "
                                          r"MPI's mpirun's job\) must be a port number, 1-65535"):
        setup_engine("ddp", {**OPENMPI, "MASTER_ADDR": "gpu07", "MASTER_PORT": port})
    assert not dist.is_initialized()


@pytest.mark.parametrize(("env", "title"), [(SRUN, "SLURM's srun"), (OPENMPI, "Open MPI's mpirun"),
                                            (TORCHRUN, "torchrun or the DeepSpeed launcher")])
def test_plain_engine_names_the_launcher_of_a_world_of_several(env: dict[str, str], title: str) -> None:
    with pytest.raises(ConfigError, match=rf"engine: plain runs in one process, but this is rank \d+ of a "
                                          rf"world of \d+ \(started by {title}\)"):
        setup_engine("plain", env)


@pytest.fixture()
def clean_launch_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the variables setup exports, and put back whatever it sets when the test ends."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_step_of_one_task_needs_no_rendezvous(clean_launch_environ: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    one = {"SLURM_STEP_ID": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    setup = setup_engine("ddp", one)
    try:
        assert (setup.rank, setup.world_size) == (0, 1)
        assert "started without a launcher" not in capsys.readouterr().err
        assert "RANK" not in os.environ  # nothing exported: the group is in-process
    finally:
        setup.close()
    assert not dist.is_initialized()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_mpirun_world_meets_at_master_addr_and_exports_torchrun_variables(clean_launch_environ: None) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    setup = setup_engine("ddp", env)
    try:
        assert (setup.rank, setup.world_size) == (0, 1)
        exported = {name: os.environ.get(name) for name in
                    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        assert exported == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}
        assert place(launch_info()) == (0, 1, 0, "torchrun")  # what torchrun would have set
    finally:
        setup.close()
    assert not dist.is_initialized()
