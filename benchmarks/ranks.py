"""Running a benchmark function on several gloo ranks of this machine, and the memory they use.

:func:`launch` spawns ``world_size`` processes that join one process group (``MASTER_ADDR`` on
loopback, a free port, one thread each so that ranks do not fight over the cores) and returns
what each rank's function returned. :func:`peak_extra_rss` samples a process's resident memory
while a function runs.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(anonymous: bool = False) -> int:
    """Resident memory of this process (Linux ``/proc``); ``anonymous``: only the memory no file
    backs (allocations, not the pages of a memory-mapped checkpoint)."""
    if anonymous:
        with open("/proc/self/status") as handle:
            kib = next(line.split()[1] for line in handle if line.startswith("RssAnon:"))
        return int(kib) * 1024
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def peak_extra_rss(fn: Callable[[], Any], anonymous: bool = False) -> int:
    """Peak resident bytes above the starting ones while ``fn`` runs (sampled at ~1 kHz)."""
    start, peak, done = rss_bytes(anonymous), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(anonymous))
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss_bytes(anonymous)) - start


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple, out: str) -> None:
    # FSDP1 warns about every unit that mixes frozen and trainable parameters (expected with
    # deltas, and printed with every name) and that it is deprecated in favour of FSDP2.
    warnings.filterwarnings("ignore", message=".*requires_grad=True and False")
    warnings.simplefilter("ignore", FutureWarning)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    result = fn(rank, world_size, *args)
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))


def launch(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``[fn(rank, world_size, *args) for every rank]``, run as spawned processes (``fn`` joins the
    process group itself: the environment names the rendezvous). A rank that fails fails all."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(_rank_main, args=(fn, world_size, _free_port(), args, out), nprocs=world_size,
                               start_method="spawn")
            return [json.loads(Path(out, f"rank-{rank}.json").read_text()) for rank in range(world_size)]
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous
