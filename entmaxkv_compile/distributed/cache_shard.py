"""How the sequence is split over the ranks of a context parallel group, for models that keep
their own caches (the backend's ``context_parallel`` option).

Rank ``r`` of ``W`` owns the global positions ``[r*C, (r+1)*C)``, ``C`` the capacity split evenly
and rounded up to whole pages (the rule :class:`~.context_parallel.ContextParallelDecoder` uses):
a model compiled with ``context_parallel`` is built with its caches ``C`` rows long, and its
prompt's K/V are loaded rank by rank (prefill is not context parallel).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..checks import check_int_arg, check_kv_cache
from .collectives import Collectives

__all__ = ["context_parallel_capacity", "local_capacity_for", "scatter_prompt"]


def local_capacity_for(total_tokens: int, page_size: int, world_size: int) -> int:
    """``ceil(total_tokens / (world_size * page_size)) * page_size``: each rank's rows."""
    return -(-total_tokens // (world_size * page_size)) * page_size


def context_parallel_capacity(total_tokens: int, page_size: int = 16, group: Optional[Any] = None) -> int:
    """The rows ``C`` of each rank's cache so that the ranks of ``group`` (None: the default
    group, or one process) hold ``total_tokens`` per sequence together: ``ceil(total / (W*P)) * P``.
    Size the model's caches to it on every rank; rank ``r`` then owns positions ``[r*C, (r+1)*C)``."""
    check_int_arg("total_tokens", total_tokens, minimum=1)
    check_int_arg("page_size", page_size, minimum=1)
    return local_capacity_for(total_tokens, page_size, Collectives(group).world_size)


def scatter_prompt(k_full: torch.Tensor, v_full: torch.Tensor, capacity: int,
                   group: Optional[Any] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(k_local, v_local) [B, H, capacity, D]``: rows ``[r*C, (r+1)*C)`` of the
    global ``k_full, v_full [B, H, T, D]`` (``T <= W*C``), zero past ``T``. Copy them into the
    model's cache buffers of that layer (``cache.copy_(k_local)``) before the first decode step;
    the backend then fills the page statistics from them on its first compiled call."""
    check_kv_cache("k_full", k_full)
    if not isinstance(v_full, torch.Tensor) or v_full.shape != k_full.shape:
        raise ValueError(f"v_full must be a tensor of k_full's shape {tuple(k_full.shape)}, got "
                         f"{tuple(v_full.shape) if isinstance(v_full, torch.Tensor) else type(v_full).__name__}")
    check_int_arg("capacity", capacity, minimum=1)
    comm = Collectives(group)
    if k_full.shape[2] > comm.world_size * capacity:
        raise ValueError(f"k_full holds {k_full.shape[2]} tokens, more than the {comm.world_size} ranks' "
                         f"{comm.world_size * capacity} (capacity {capacity} each)")
    start = comm.rank * capacity
    shards = []
    for full in (k_full, v_full):
        local = full.new_zeros((*full.shape[:2], capacity, full.shape[3]))
        rows = full[:, :, start:start + capacity]
        local[:, :, :rows.shape[2]] = rows
        shards.append(local)
    return shards[0], shards[1]
