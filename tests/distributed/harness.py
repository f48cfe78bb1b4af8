"""Run a function on several gloo ranks from inside pytest, without torchrun, and never hang.

``run_ranks(fn, world_size=2, timeout=300, args=())`` starts ``world_size`` processes with the
``spawn`` start method. Each one joins a gloo process group through a ``FileStore`` in a fresh
temporary directory (no fixed port, so tests and xdist workers never collide), calls
``fn(rank, world_size, *args)`` and sends back its return value (it must pickle) or its
traceback through a pipe of its own.

On the first failure (an exception, a rank that dies without reporting, e.g. a segfault) or when
the deadline passes, every child is terminated, then killed, and an ``AssertionError`` lists each
failing rank with its traceback. A rank still running at the deadline is reported with the stack
it was stuck in (dumped by ``faulthandler`` just before the deadline).

``fn`` must be a module-level function of an importable module (children re-import it).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = str(Path(__file__).resolve().parents[2])
_GRACE_S = 5.0
"""How long a terminated child gets before it is killed."""


def run_ranks(fn: Callable[..., Any], world_size: int = 2, timeout: float = 300,
              args: tuple = ()) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, run in parallel.

    Raises:
        AssertionError: a rank raised, died, or did not finish within ``timeout`` seconds
            (counted from the call, process start-up included). Every child is gone by then.
    """
    ctx = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="deltadist_ranks_")
    init_method = "file://" + os.path.join(workdir, "rendezvous")
    deadline = time.time() + timeout
    procs: list[mp.process.BaseProcess] = []
    readers: dict[Connection, int] = {}
    try:
        with _child_environment():
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_child_main,
                    args=(fn, rank, world_size, tuple(args), init_method, workdir, deadline, writer),
                    name=f"rank{rank}", daemon=True,
                )
                proc.start()
                writer.close()  # the child holds the only write end: EOF means it is gone
                procs.append(proc)
                readers[reader] = rank
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        while len(results) < world_size and not failures:
            remaining = deadline - time.time()
            if remaining <= 0:
                break
            for conn in wait(list(readers), timeout=min(remaining, 1.0)):
                rank = readers.pop(conn)
                try:
                    status, payload = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    procs[rank].join(_GRACE_S)
                    stacks = _read(os.path.join(workdir, f"rank{rank}.stacks"))
                    status, payload = "error", (
                        f"rank {rank} exited (exit code {procs[rank].exitcode}) without reporting "
                        "a result (killed, or crashed in native code; its stderr has more)"
                        + (f"\n{stacks}" if stacks else "")
                    )
                finally:
                    conn.close()
                if status == "ok":
                    results[rank] = payload
                else:
                    failures[rank] = payload
        if len(results) == world_size:
            for proc in procs:  # every rank reported success and is on its way out
                proc.join(max(0.0, min(_GRACE_S, deadline - time.time())))
            return [results[r] for r in range(world_size)]
        timed_out = not failures
        if timed_out:
            for rank in readers.values():
                stacks = _read(os.path.join(workdir, f"rank{rank}.stacks"))
                failures[rank] = (
                    f"rank {rank} did not finish within {timeout:g} s and was killed.\n"
                    + (f"Its stacks shortly before the deadline:\n{stacks}" if stacks else "")
                )
        report = "\n".join(
            f"---- rank {rank} ----\n{text.rstrip()}" for rank, text in sorted(failures.items())
        )
        what = "timed out" if timed_out else "failed"
        raise AssertionError(f"{getattr(fn, '__name__', fn)} {what} on {len(failures)} of "
                             f"{world_size} ranks:\n{report}")
    finally:
        _stop(procs)
        for conn in readers:
            conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


class _child_environment:
    """Environment the spawned children inherit: one OpenMP thread, the repo importable."""

    def __enter__(self) -> None:
        self._saved = dict(os.environ)
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if REPO_ROOT not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *paths])
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    def __exit__(self, *exc: object) -> None:
        os.environ.clear()
        os.environ.update(self._saved)


def _stop(procs: list) -> None:
    """Terminate, then kill, every child still alive; reap them all."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    end = time.time() + _GRACE_S
    for proc in procs:
        proc.join(max(0.0, end - time.time()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(_GRACE_S)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _send(writer: Connection, status: str, payload: Any) -> None:
    # Plain pickle, not multiprocessing's: that one would pass tensors through shared memory
    # owned by this process, which is gone by the time the parent unpickles them.
    writer.send_bytes(pickle.dumps((status, payload)))


def _child_main(fn: Callable[..., Any], rank: int, world_size: int, args: tuple, init_method: str,
                workdir: str, deadline: float, writer: Connection) -> None:
    """Body of one rank: process group up, ``fn``, report, process group down."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    stacks = open(os.path.join(workdir, f"rank{rank}.stacks"), "w")
    faulthandler.enable(file=stacks)  # a crash in native code (segfault) leaves its stack there
    faulthandler.dump_traceback_later(max(1.0, deadline - time.time() - 2.0), file=stacks)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
    except BaseException:
        # Report first: the parent then stops the other ranks, which may wait in a collective.
        _send(writer, "error", traceback.format_exc())
        writer.close()
        raise SystemExit(1)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
        _send(writer, "ok", result)
    except BaseException:
        _send(writer, "error", traceback.format_exc())
    finally:
        faulthandler.cancel_dump_traceback_later()
        faulthandler.disable()
        writer.close()
        stacks.close()
