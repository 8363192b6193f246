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
"""

from __future__ import annotations

import torch

__all__ = ["certify_policy_update_", "dense_rows_for"]


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
