"""The context parallel step on the decode kernels: the global threshold from local ones.

Each rank runs the single-GPU K pass over its selected pages and solves its *local* exact
threshold ``tau_r`` (``runtime/attend/partial.py``). Adding scores only raises the threshold, so
the global one is at least ``tau_lo = max_r tau_r`` (one ``all_reduce(MAX)``), and the global
support lies among the scores above ``tau_lo``: on every rank a subset of its own local support,
typically tens to hundreds per head. Each rank compacts those into ``cap`` slots per head (their
count in one more); one ``all_gather`` gives every rank all of them, and one small kernel solves
the exact threshold of that set, which is the global threshold. The V pass at it and one
``all_reduce(SUM)`` of ``sum p v`` and ``sum p`` give the output. Three collectives and about ten
launches beyond the single-GPU step; none of the buffers is larger than ``W * B * Hq * (cap + 1)``
floats; nothing is read twice.

The local thresholds travel as one float per head: NaN (a poisoned head) as ``+inf`` and ``+inf``
(nothing attended on this rank) as ``-inf``, so the MAX carries both flags.

A head with more than ``cap`` scores above ``tau_lo`` on some rank (planted spans of thousands of
similar keys, flat scores) is gathered again with room for all of them (one host read of the
gathered counts, the same on every rank), up to ``max_cap``; beyond that it is reported in
``overflow`` and the caller takes the exact pure-torch path for that step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .collectives import Collectives

__all__ = ["KernelThreshold", "kernel_output", "kernel_threshold"]


class KernelThreshold(NamedTuple):
    """The global threshold of the kernel path, per ``[B, Hkv, G]`` head: ``tau`` (float32, z
    units; ``+inf`` with nothing attended anywhere, NaN where some rank attended a NaN/``+inf``
    score), ``exact`` (not poisoned and no rank overflowed); ``local`` the rank's K pass."""

    local: Any
    tau: torch.Tensor
    exact: torch.Tensor

    @property
    def overflow(self) -> torch.Tensor:
        """Where some rank had more scores to gather than the gather's room (computed on demand:
        only the host-side re-gather decision reads it)."""
        return ~self.exact & ~torch.isnan(self.tau)

    @property
    def lower(self) -> torch.Tensor:
        """A proven lower bound of the threshold: ``tau`` itself (the solve is exact, or the caller
        falls back to the levels)."""
        return self.tau


def kernel_threshold(comm: Collectives, impl: Any, q: torch.Tensor, k_cache: torch.Tensor, lengths: torch.Tensor,
                     page_indices: torch.Tensor, num_selected: torch.Tensor, *, page_size: int, alpha: float,
                     scale: float, cap: int, max_cap: int | None = None) -> KernelThreshold:
    """The exact global threshold of the selected pages of every rank (see the module doc).

    ``cap`` scores per head are gathered first; with ``max_cap`` (a host read, the same on every
    rank), a head that had more is gathered again with room for all of them, up to ``max_cap``.
    """
    batch, q_heads = q.shape[:2]
    kv_heads = k_cache.shape[1]
    local = impl.local_candidates(q, k_cache, lengths, page_indices, num_selected, page_size=page_size,
                                  alpha=alpha, scale=scale)
    tau_lo = comm.max_(torch.nan_to_num(local.tau, nan=float("inf"), posinf=float("-inf")))
    gathered = comm.gather(impl.gather_above(local, tau_lo, cap))  # [W, B, Hq, cap + 1]
    if max_cap is not None:
        needed = int(gathered[..., cap].max())
        if cap < needed <= max_cap:
            cap = 1 << (needed - 1).bit_length()
            gathered = comm.gather(impl.gather_above(local, tau_lo, cap))
    tau, exact = impl.solve_gathered(gathered, tau_lo, alpha)
    shape = (batch, kv_heads, q_heads // kv_heads)
    return KernelThreshold(local, tau.view(shape), exact.view(shape))


def kernel_output(comm: Collectives, impl: Any, solved: KernelThreshold, v_cache: torch.Tensor, alpha: float,
                  extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B, Hkv, G, D], extra summed over ranks)`` at the global threshold: each rank's
    unnormalised sums, one ``all_reduce(SUM)`` (``extra [B, Hkv, G, E]`` rides along); 0 for a head
    with nothing attended, NaN for a poisoned one."""
    shape = solved.tau.shape
    width = 0 if extra is None else extra.shape[-1]
    packed = impl.partial_sums(solved.local, v_cache, solved.tau.flatten(1), alpha, width)
    head_dim = packed.shape[-1] - 1 - width
    if extra is not None:
        packed[..., head_dim + 1:] = extra.flatten(1, 2)
    comm.sum_(packed)
    # sum p is 1 up to rounding where anything is attended, 0 where nothing is (0 / tiny = 0), NaN
    # for a poisoned head (written so by partial_sums)
    out = packed[..., :head_dim] / packed[..., head_dim:head_dim + 1].clamp_min(1e-30)
    return out.view(*shape, head_dim), (None if extra is None else packed[..., head_dim + 1:].view(*shape, width))
