"""Run a function on ``W`` freshly spawned processes of one process group, with a deadline.

For tests and the ``--smoke`` benchmark on CPU (gloo): the processes rendezvous through a file
store in a private temporary directory (no port to find, none to collide on), each returns a
picklable result, and a run that outlives ``timeout_s`` is terminated and raises instead of
hanging its caller. On GPUs, launch with ``torchrun`` instead.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn"]


def spawn(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, backend: str = "gloo",
          timeout_s: float = 120.0, threads: int = 1) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each run in its own process of a group of
    ``world_size`` (``fn`` must be importable by name: a module-level function). Raises
    ``TimeoutError`` after ``timeout_s`` seconds (the processes are terminated) and re-raises a
    process's exception."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_entry, args=(fn, world_size, backend, tmp, tuple(args), timeout_s, threads),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise TimeoutError(f"{world_size} processes running {getattr(fn, '__name__', fn)} did not "
                                   f"finish within {timeout_s} s")
        return [torch.load(os.path.join(tmp, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, backend: str, tmp: str, args: tuple,
           timeout_s: float, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"{rank}.pt"))
