"""The context parallel step on the decode kernels: the global threshold from local ones.

Each rank runs the single-GPU K pass over its selected pages and solves its *local* exact
threshold ``tau_r`` (``runtime/attend/partial.py``). Adding scores only raises the threshold, so
the global one is at least ``tau_lo = max_r tau_r`` (one ``all_reduce(MAX)``), and the global
support lies among the scores above ``tau_lo``: on every rank a subset of its own local support,
typically tens to hundreds per head. Each rank compacts those into ``cap`` slots per head; one
``all_gather`` gives every rank all of them, and the exact threshold of that small set
(``math.reference.entmax_threshold``, sort-based for alpha 1.5 and 2, bracketed Newton otherwise,
in float64) is the global threshold. The V pass at it and one ``all_reduce(SUM)`` of ``sum p v``
and ``sum p`` give the output. Three collectives per solve and output, none of them larger than
``W * B * Hq * (cap + 1)`` floats; nothing is read twice.

A head with more than ``cap`` scores above ``tau_lo`` on some rank (planted spans of thousands of
similar keys, flat scores) is gathered again with room for all of them (one host read of the
gathered counts, the same on every rank), up to ``max_cap``; beyond that it is reported in
``overflow`` and the caller takes the exact pure-torch path for that step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..math.reference import entmax_threshold
from .collectives import Collectives
from .global_tau import sum_and_normalize

__all__ = ["KernelThreshold", "kernel_output", "kernel_threshold"]

_FLOOR_MARGIN = 1e-4


class KernelThreshold(NamedTuple):
    """The global threshold of the kernel path, per ``[B, Hkv, G]`` head: ``tau`` (float32, z
    units; ``+inf`` with nothing attended anywhere, NaN where some rank attended a NaN/``+inf``
    score), ``exact`` (not poisoned and no rank overflowed), ``overflow``; ``local`` the rank's K
    pass."""

    local: Any
    tau: torch.Tensor
    exact: torch.Tensor
    overflow: torch.Tensor

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
    poisoned = torch.isnan(local.tau)
    floor = torch.where(torch.isfinite(local.tau), local.tau, float("-inf"))
    packed = comm.max_(torch.stack([floor, poisoned.to(torch.float32)], -1))
    poisoned = packed[..., 1] > 0
    # A margin below tau_lo: the local solve is exact up to float32 rounding, and gathering a few
    # scores below the global threshold never changes it (they add nothing there).
    floor = packed[..., 0] - _FLOOR_MARGIN * (1.0 + packed[..., 0].abs())
    floor = torch.where(poisoned, float("inf"), floor)  # a poisoned head gathers nothing
    gathered, counts = _gather(comm, impl, local, floor, cap)
    if max_cap is not None:
        needed = int(counts.max())
        if cap < needed <= max_cap:
            cap = 1 << (needed - 1).bit_length()
            gathered, counts = _gather(comm, impl, local, floor, cap)
    overflow = (counts > cap).any(0)
    tau = entmax_threshold(gathered / (alpha - 1.0), alpha).to(torch.float32)
    tau = torch.where(poisoned, float("nan"), tau)
    shape = (batch, kv_heads, q_heads // kv_heads)
    exact = (~overflow & ~poisoned).view(shape)
    return KernelThreshold(local, tau.view(shape), exact, overflow.view(shape))


def _gather(comm: Collectives, impl: Any, local: Any, floor: torch.Tensor,
            cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(every rank's scores above floor [B, Hq, W*cap] float64, counts [W, B, Hq])``: one all_gather."""
    scores, count = impl.gather_above(local, floor, cap)
    everyone = comm.gather(torch.cat([scores, count.to(torch.float32)[..., None]], -1))  # [W, B, Hq, cap+1]
    return everyone[..., :cap].movedim(0, -2).flatten(-2).to(torch.float64), everyone[..., cap]


def kernel_output(comm: Collectives, impl: Any, solved: KernelThreshold, v_cache: torch.Tensor, alpha: float,
                  extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B, Hkv, G, D], extra summed over ranks)`` at the global threshold: each rank's
    unnormalised sums, one ``all_reduce(SUM)`` (``extra [B, Hkv, G, E]`` rides along); 0 for a head
    with nothing attended, NaN for a poisoned one."""
    shape = solved.tau.shape
    num, den = impl.partial_sums(solved.local, v_cache, solved.tau.flatten(1), alpha)
    out, extra = sum_and_normalize(comm, num.view(*shape, -1), den.view(*shape, 1), extra)
    return torch.where(torch.isnan(solved.tau)[..., None], float("nan"), out), extra
