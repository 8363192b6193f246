"""When a certified step should not try to skip pages: the read-everything fallback that never loses.

A certified step pays for its bounds (the gaussian selection, one kmin/kmax read) before it knows
how many pages they clear. When they clear few, as on flat or iid keys, it then reads nearly every
page anyway and is slower than the dense exact step, which is exact by construction. So each
sequence carries a counter ``certify_skip`` (int32 ``[B]``, kept with its page statistics): a
certified step that had to read more than ``dense_above`` of the sequence's pages sets it to
``probe_every - 1``, and while it is positive the step reads every page directly (no selection,
no bounds: the dense exact step, certified wherever tau is finite) and counts it down; then the
bounds are tried again. Everything happens on device (no host sync), so it runs inside CUDA graphs.
The policy only decides what is read, never what is returned: either way the output equals full
entmax.

On the host, :class:`HostFallbackSchedule` follows the same period so that a ``Decoder`` replaying
its own CUDA graphs can replay the dense step's graph (no selection or bound launches at all) on
the steps the device would read densely anyway; it learns from copies of the counter that have
landed and never waits for one.
"""

from __future__ import annotations

import torch

__all__ = ["HostFallbackSchedule", "certify_policy_update_", "dense_rows_for"]


def dense_rows_for(certify_skip: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: the sequences whose next certified step reads every page directly."""
    return certify_skip > 0


def certify_policy_update_(
    certify_skip: torch.Tensor,
    dense_rows: torch.Tensor,
    num_selected: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    page_size: int,
    num_pages: int,
    dense_above: float,
    probe_every: int,
) -> None:
    """Advance ``certify_skip`` in place after a certified step that read ``num_selected`` pages
    per KV head (int ``[B, Hkv]``) and ran dense on ``dense_rows`` (bool ``[B]``)."""
    length = seqlens.to(torch.int64).clamp(0, num_pages * page_size)
    pages = (length + page_size - 1) // page_size * num_selected.shape[1]
    read = num_selected.to(torch.int64).sum(1)
    heavy = read.to(torch.float32) > dense_above * pages.to(torch.float32)
    after = torch.where(dense_rows, certify_skip - 1, torch.where(heavy, probe_every - 1, 0))
    certify_skip.copy_(after.clamp(min=0))


class HostFallbackSchedule:
    """Which recorded step a ``Decoder`` replays: ``"dense"`` on the steps where every sequence's
    fallback is expected to run, ``"step"`` (the device decides) otherwise.

    After a probe that read too much the device counter runs ``probe_every - 1`` dense steps and
    then probes again; the host keeps that period itself (``since_probe``) and only *learns*
    whether the last probe it has news of was heavy, from a copy of the counter taken after a
    ``"step"`` replay once that copy has landed (an event query, no wait). So when the host runs
    many steps ahead of the GPU the period is still kept; what lags is only the news, and stale
    news can only replace a probe by a dense step (exact either way) or let the device decide.
    """

    def __init__(self, probe_every: int) -> None:
        self.probe_every = int(probe_every)
        self.heavy = False  # the last landed news: every sequence's fallback was running
        self.since_probe = 0

    def choose(self) -> str:
        """The variant of the next step; counts it into the period."""
        if self.heavy and self.since_probe < self.probe_every - 1:
            self.since_probe += 1
            return "dense"
        self.since_probe = 0
        return "step"

    def learn(self, counters: list[int]) -> None:
        """News: the device counters (``certify_skip``) as copied after a ``"step"`` replay."""
        self.heavy = bool(counters) and min(counters) > 0
