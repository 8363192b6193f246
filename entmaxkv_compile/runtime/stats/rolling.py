"""Page statistics of a rolling-buffer cache: rebuild the written slot's page, track the position.

A rolling buffer (Mistral) has ``S`` slots; the token at position ``x`` is written at slot
``x % S``, so once the buffer wraps a write replaces an old row. A page's running min/max cannot
forget the row it loses, so after each write the page holding the written slot is **rebuilt**
from the cache rows of that page (O(P*D) per sequence and KV head, not the whole cache):
:func:`stats_rebuild_page_`, the CPU implementation of ``entmaxkv::page_stats_rebuild`` and the
oracle of its kernel (``kernel.stats_rebuild_page_``).

**Order rule.** The order state (``last_position``/``valid``, ``reference.py``) of a rolling
cache records the *position*, not the slot. A rebuilt page is exact whatever came before, so a
write keeps the statistics sound exactly when the rows it makes visible were all written since
their page was last rebuilt: when it does not skip a position, ``0 <= x <= last + 1``
(:func:`rolling_in_order`; a repeat or a rewind only shrinks or keeps the visible slots, whose
pages were rebuilt when their rows were written). A wrap (``x >= S``) is in order. A gap clears
``valid`` until the next prefill, as for a full-length cache. ``stats_valid_for`` then holds for
``seqlens = min(x + 1, S)``, which is at most ``last + 1``.
"""

from __future__ import annotations

import torch

from ...checks import check_kv_cache, check_lengths, check_page_size, check_positions
from .reference import _check_buffers_match, masked_page_stats, storable_m2

__all__ = ["rolling_in_order", "rolling_seqlens", "stats_rebuild_page_", "stats_track_rolling_"]


def rolling_seqlens(positions: torch.Tensor, slots: int) -> torch.Tensor:
    """int64 ``[B]``: the slots a rolling buffer of ``slots`` slots holds once position
    ``positions[b]`` is written, ``min(positions + 1, slots)`` (every written slot)."""
    return (positions.to(torch.int64) + 1).clamp(max=slots)


def stats_rebuild_page_(
    k_cache: torch.Tensor,
    slots: torch.Tensor,
    seqlens: torch.Tensor,
    page_size: int,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    kmean: torch.Tensor,
    km2: torch.Tensor,
) -> None:
    """Recompute, in place, the statistics of the page holding row ``slots[b]`` of each sequence
    from that page's cache rows below ``seqlens[b]`` (the other pages are not touched).

    The same values as :func:`reference.stats_prefill_` gives that page (min/max in K's dtype,
    two-pass mean and M2 in float32; an empty page gets zeros). A slot outside ``[0, Nmax)``
    (possible only without value checks) is clamped into it: rebuilding any page from the cache
    is exact, so nothing unsound can come of it.
    """
    check_kv_cache("k_cache", k_cache)
    page_size = check_page_size(page_size)
    batch, kv_heads, max_seqlen, head_dim = k_cache.shape
    check_positions(slots, batch, max_seqlen, device=k_cache.device, check_values=False)
    check_lengths("seqlens", seqlens, batch, device=k_cache.device)
    _check_buffers_match(k_cache, page_size, kmin, kmax, kmean, km2)

    page = slots.to(torch.int64).clamp(0, max_seqlen - 1) // page_size  # [B]
    rows = page[:, None] * page_size + torch.arange(page_size, device=k_cache.device)  # [B, P]
    valid = rows < seqlens.to(torch.int64).clamp(0, max_seqlen)[:, None]  # rows past Nmax never count
    index = rows.clamp(max=max_seqlen - 1)[:, None, :, None].expand(batch, kv_heads, page_size, head_dim)
    k = k_cache.gather(2, index)  # [B, Hkv, P, D]
    page_index = page.view(batch, 1, 1, 1).expand(batch, kv_heads, 1, head_dim)
    lo, hi, mean, m2 = masked_page_stats(k, valid[:, None, :, None], 2)
    for stat, value in zip((kmin, kmax, kmean, km2), (lo, hi, mean, storable_m2(m2, km2.dtype))):
        stat.scatter_(2, page_index, value.to(stat.dtype))


def rolling_in_order(positions: torch.Tensor, last_position: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: a rolling write at ``positions`` keeps the statistics sound (the module's
    order rule: ``0 <= position <= last + 1``)."""
    pos = positions.to(torch.int64)
    return (pos >= 0) & (pos <= last_position.to(torch.int64) + 1)


def stats_track_rolling_(positions: torch.Tensor, last_position: torch.Tensor, valid: torch.Tensor) -> None:
    """Record a rolling write at ``positions`` (the positions, not the slots) in the order state,
    in place, on device: ``valid`` drops to False where it was not :func:`rolling_in_order`, and
    ``last_position`` becomes ``positions``."""
    valid.logical_and_(rolling_in_order(positions, last_position))
    last_position.copy_(positions.to(torch.int64))
