"""Per-page key statistics: one vectorised prefill pass and an O(D) in-place append.

Page ``p`` of a static cache ``[B, Hkv, Nmax, D]`` is rows ``[p*P, (p+1)*P)``. Per page and KV head
we keep ``kmin``/``kmax`` (in K's dtype: a min/max of K values is a K value, so they are exact and
feed the Quest bound and the certificate) and Welford's ``kmean``/``km2`` (the gaussian selector's
moments; ``var = km2 / n_p``), stored in float32 by default or, compactly, in K's dtype
(``moment_dtype``): arithmetic is float32 either way, only the stored values are rounded. Rows at or past a sequence's length never touch the
statistics, so garbage in unused cache rows is harmless. Per sequence, ``KVPageStats`` also keeps
the last appended position and a ``valid`` flag that an out-of-order append clears on device
(``stats_track_``), so no certificate rests on statistics that were not kept in order. All
functions are pure torch, fixed-shape and free of host syncs; they are the CPU implementation of the ``page_stats_*`` ops and the oracle
of their kernels.
"""

from __future__ import annotations

import torch

from .._common import spans
from ...checks import (
    FLOAT_DTYPES,
    check_kv_cache,
    check_page_size,
    check_positions,
    check_seqlens,
    check_stats_buffers,
    check_tensor,
    has_values,
    num_pages_for,
)

__all__ = [
    "KVPageStats",
    "append_in_order",
    "page_token_counts",
    "resolve_moment_dtype",
    "stats_append_",
    "stats_prefill_",
    "stats_state_after_prefill_",
    "stats_track_",
]


def resolve_moment_dtype(moment_dtype: torch.dtype | str | None, cache_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of kmean/km2: None or ``"float32"`` -> float32, ``"cache"`` -> the cache's
    dtype, a torch dtype -> itself, which must be float32 or ``cache_dtype``."""
    if moment_dtype is None or moment_dtype == "float32":
        return torch.float32
    if moment_dtype == "cache":
        return cache_dtype
    if not isinstance(moment_dtype, torch.dtype):
        raise TypeError(f"moment_dtype must be a torch dtype, 'float32', 'cache' or None, got {moment_dtype!r}")
    if moment_dtype not in (torch.float32, cache_dtype):
        raise ValueError(f"moment_dtype must be float32 or the cache dtype {cache_dtype}, got {moment_dtype}")
    return moment_dtype


def page_token_counts(seqlens: torch.Tensor, page_size: int, num_pages: int) -> torch.Tensor:
    """Valid tokens per page, ``n_p = clamp(L - p*P, 0, P)``: int64 ``[B, num_pages]``."""
    starts = torch.arange(num_pages, device=seqlens.device, dtype=torch.int64) * page_size
    return (seqlens.to(torch.int64)[:, None] - starts[None, :]).clamp(0, page_size)


def _check_buffers_match(k_cache: torch.Tensor, page_size: int, kmin, kmax, kmean, km2) -> None:
    batch, kv_heads, max_seqlen, head_dim = k_cache.shape
    check_stats_buffers(
        kmin, kmax, kmean, km2,
        batch=batch, kv_heads=kv_heads, num_pages=num_pages_for(max_seqlen, page_size), head_dim=head_dim,
    )
    if kmin.dtype != k_cache.dtype:
        raise TypeError(f"kmin/kmax must have k_cache's dtype {k_cache.dtype}, got {kmin.dtype}")
    if kmin.device != k_cache.device:
        raise ValueError(f"the stat buffers must be on k_cache's device {k_cache.device}, got {kmin.device}")


def stats_prefill_(
    k_cache: torch.Tensor,
    seqlens: torch.Tensor,
    page_size: int,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    kmean: torch.Tensor,
    km2: torch.Tensor,
) -> None:
    """Fill the four stat buffers from the first ``seqlens[b]`` rows of ``k_cache``, in place.

    The cache viewed as ``[B, Hkv, Npages, P, D]`` (the last page padded when ``Nmax`` is not a
    multiple of ``P``), masked by ``seqlens``, in page spans of bounded size (``spans``: the
    float32 temporaries of the whole cache did not fit a GPU at 8 x 1M tokens). Pages with no valid
    token get zeros. The variance uses the two-pass form (mean first), which is exact up to rounding.
    """
    check_kv_cache("k_cache", k_cache)
    page_size = check_page_size(page_size)
    batch, kv_heads, max_seqlen, head_dim = k_cache.shape
    check_seqlens(seqlens, batch, max_seqlen, device=k_cache.device, check_values=False)
    _check_buffers_match(k_cache, page_size, kmin, kmax, kmean, km2)
    num_pages = num_pages_for(max_seqlen, page_size)
    # Lengths are clamped to [0, Nmax] (only reachable with check_values=False), so the padding
    # rows past the capacity never count as tokens.
    length = seqlens.to(torch.int64).clamp(0, max_seqlen)
    for first, last in spans(num_pages, batch * kv_heads * page_size * head_dim):
        rows = torch.arange(first * page_size, last * page_size, device=k_cache.device)
        k = k_cache[:, :, first * page_size:last * page_size]
        pad = rows.numel() - k.shape[2]
        k = torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k
        k = k.reshape(batch, kv_heads, last - first, page_size, head_dim)
        valid = rows.view(last - first, page_size)[None] < length[:, None, None]  # [B, pages, P]
        lo, hi, mean, m2 = masked_page_stats(k, valid[:, None, :, :, None], 3)
        for stat, value in zip((kmin, kmax, kmean, km2), (lo, hi, mean, storable_m2(m2, km2.dtype))):
            stat[:, :, first:last].copy_(value.squeeze(3))


def m2_limit(dtype: torch.dtype) -> float:
    """The largest finite value of M2's storage ``dtype``: where a stored M2 saturates."""
    return float(torch.finfo(dtype).max)


def storable_m2(m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 M2 in its storage ``dtype``, saturating at the dtype's largest finite value.

    One outlier token can push a page's M2 past float16's 65504 while every key is finite
    (benchmarks' heavy-tailed keys at 1M tokens: one page in each of two KV heads of eight).
    Stored as +inf, it made the whole KV head's single-Gaussian estimate infinite and its
    selection degenerate: on the H200 that family read 35.5% of the pages with float16 moments
    against 14.0% with float32 ones, i.e. every page of those two heads; the reference kept
    other pages than with float32 moments. Saturated, the page keeps a large finite variance,
    which still marks it likely. NaN and +inf (non-finite keys) pass through, so such pages are
    still flagged.
    """
    big = m2_limit(dtype)
    return torch.where((m2 > big) & (m2 < float("inf")), big, m2).to(dtype)


def masked_page_stats(k: torch.Tensor, valid: torch.Tensor,
                      dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(min, max, mean, M2)`` of the rows of ``k`` along its page-row axis ``dim`` where ``valid``
    (bool, broadcast against ``k``), that axis kept with size 1: min/max in K's dtype, the mean
    and the two-pass M2 in float32 (exact up to rounding); all zeros for a page with no valid row."""
    counts = valid.sum(dim, keepdim=True)
    nonempty = counts > 0
    inf = float("inf")
    lo = torch.where(nonempty, torch.where(valid, k, inf).amin(dim, keepdim=True), 0)
    hi = torch.where(nonempty, torch.where(valid, k, -inf).amax(dim, keepdim=True), 0)
    kf = torch.where(valid, k.to(torch.float32), 0.0)
    mean = kf.sum(dim, keepdim=True) / counts.clamp(min=1).to(torch.float32)
    dev = torch.where(valid, kf - mean, 0.0)
    return lo, hi, mean, (dev * dev).sum(dim, keepdim=True)


def stats_append_(
    k_cache: torch.Tensor,
    positions: torch.Tensor,
    page_size: int,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    kmean: torch.Tensor,
    km2: torch.Tensor,
) -> None:
    """Fold the row written at ``positions[b]`` of each sequence into its page's stats, in place.

    O(D) per sequence and KV head, vectorised over the batch (ragged positions are fine). When
    ``positions % P == 0`` the page is reset from that row; otherwise a Welford step with
    ``n = positions % P + 1``, so appends within a page must come in order (``stats_track_``
    flags the sequences where they did not). A position outside ``[0, Nmax)`` (possible only
    without the value checks) reads and writes nothing.
    """
    check_kv_cache("k_cache", k_cache)
    page_size = check_page_size(page_size)
    batch, kv_heads, max_seqlen, head_dim = k_cache.shape
    check_positions(positions, batch, max_seqlen, device=k_cache.device, check_values=False)
    _check_buffers_match(k_cache, page_size, kmin, kmax, kmean, km2)

    inside = ((positions >= 0) & (positions < max_seqlen)).view(batch, 1, 1, 1)
    pos = positions.to(torch.int64).clamp(0, max_seqlen - 1)
    row_index = pos.view(batch, 1, 1, 1).expand(batch, kv_heads, 1, head_dim)
    page_index = (pos // page_size).view(batch, 1, 1, 1).expand(batch, kv_heads, 1, head_dim)
    offset = (pos % page_size).view(batch, 1, 1, 1)
    fresh = offset == 0
    count = (offset + 1).to(torch.float32)

    row = k_cache.gather(2, row_index)  # [B, Hkv, 1, D]
    x = row.to(torch.float32)
    old_mean = kmean.gather(2, page_index).to(torch.float32)
    delta = x - old_mean
    new_mean = torch.where(fresh, x, old_mean + delta / count)
    old_m2 = km2.gather(2, page_index).to(torch.float32)
    new_m2 = torch.where(fresh, 0.0, old_m2 + delta * (x - new_mean))
    new_min = torch.where(fresh, row, torch.minimum(kmin.gather(2, page_index), row))
    new_max = torch.where(fresh, row, torch.maximum(kmax.gather(2, page_index), row))

    new_min = torch.where(inside, new_min, kmin.gather(2, page_index))
    new_max = torch.where(inside, new_max, kmax.gather(2, page_index))
    new_mean = torch.where(inside, new_mean.to(kmean.dtype), kmean.gather(2, page_index))
    new_m2 = torch.where(inside, storable_m2(new_m2, km2.dtype), km2.gather(2, page_index))

    kmin.scatter_(2, page_index, new_min)
    kmax.scatter_(2, page_index, new_max)
    kmean.scatter_(2, page_index, new_mean)
    km2.scatter_(2, page_index, new_m2)


def append_in_order(positions: torch.Tensor, last_position: torch.Tensor, page_size: int,
                    max_seqlen: int) -> torch.Tensor:
    """bool ``[B]``: appending at ``positions`` keeps the statistics sound.

    Sound means every row below the next length was folded into its page since the page was last
    reset. That holds when the append continues the sequence (``last + 1``) or restarts at a page
    boundary not beyond it (a rollback to ``p`` with ``p % P == 0``: the page is reset, later pages
    lie past the new length). Anything else (a gap, a repeat or a rewind inside a page, a position
    outside ``[0, Nmax)``) is not.
    """
    pos = positions.to(torch.int64)
    last = last_position.to(torch.int64)
    inside = (pos >= 0) & (pos < max_seqlen)
    return inside & ((pos == last + 1) | ((pos % page_size == 0) & (pos <= last + 1)))


def stats_track_(positions: torch.Tensor, page_size: int, max_seqlen: int, last_position: torch.Tensor,
                 valid: torch.Tensor) -> None:
    """Record an append at ``positions`` in the per-sequence state, in place, on device (no sync).

    ``valid`` (bool ``[B]``) drops to False, and stays False until the next prefill, for every
    sequence whose append was not :func:`append_in_order`; ``last_position`` (int64 ``[B]``) becomes
    ``positions``. A certificate must not rest on statistics whose ``valid`` is False.
    """
    valid.logical_and_(append_in_order(positions, last_position, page_size, max_seqlen))
    last_position.copy_(positions.to(torch.int64))


def stats_state_after_prefill_(seqlens: torch.Tensor, max_seqlen: int, last_position: torch.Tensor,
                               valid: torch.Tensor) -> None:
    """The per-sequence state after a prefill of ``seqlens`` rows: last position ``L - 1``,
    valid iff ``0 <= L <= Nmax`` (in place, no sync)."""
    length = seqlens.to(torch.int64)
    valid.copy_((length >= 0) & (length <= max_seqlen))
    last_position.copy_(length.clamp(0, max_seqlen) - 1)


def stats_valid_for(last_position: torch.Tensor, valid: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: statistics with this order state soundly describe the first ``seqlens`` rows
    (``valid`` and ``1 <= seqlens <= last_position + 1``); on device, no sync."""
    length = seqlens.to(torch.int64)
    return valid & (length >= 1) & (length <= last_position + 1)


class KVPageStats:
    """The page statistics of one attention layer's K cache: four ``[B, Hkv, Npages, D]`` buffers.

    Bytes per page and KV head: ``2 * D`` elements of K's dtype for kmin/kmax plus ``2 * D`` of the
    moment dtype for kmean/km2 (float32, or K's dtype to halve what the gaussian selector reads).

    Allocated once (``allocate`` or ``from_cache``) and updated in place by ``prefill`` and
    ``append``, so their addresses stay fixed (CUDA-graph friendly).

    Besides the four buffers it keeps, per sequence, ``last_position`` (int64 ``[B]``, the last
    row folded in) and ``valid`` (bool ``[B]``): an append that is not in order (see
    :func:`append_in_order`) sets ``valid`` to False on device, without a host sync, until the
    next ``prefill``; with ``check_values=True`` it raises instead. Pass :meth:`valid_for` of the
    decode lengths to ``certify(stats_valid=...)`` so no certificate rests on corrupted stats.
    ``certify_skip`` (int32 ``[B]``, zero at first) is the certified mode's read-everything
    counter (``runtime/certify/policy.py``): decode state of the same cache, kept here so that
    every path that owns the statistics owns it too.
    """

    def __init__(
        self,
        kmin: torch.Tensor,
        kmax: torch.Tensor,
        kmean: torch.Tensor,
        km2: torch.Tensor,
        page_size: int,
        last_position: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        self.page_size = check_page_size(page_size)
        check_tensor("kmin", kmin)
        if kmin.dim() != 4:
            raise ValueError(f"kmin must have shape [B, Hkv, Npages, D], got {tuple(kmin.shape)}")
        batch, kv_heads, num_pages, head_dim = kmin.shape
        check_stats_buffers(
            kmin, kmax, kmean, km2, batch=batch, kv_heads=kv_heads, num_pages=num_pages, head_dim=head_dim
        )
        self.kmin, self.kmax, self.kmean, self.km2 = kmin, kmax, kmean, km2
        if last_position is None:
            last_position = torch.full((batch,), -1, dtype=torch.int64, device=kmin.device)
        if valid is None:
            valid = torch.ones((batch,), dtype=torch.bool, device=kmin.device)
        for name, buf, dtype in (("last_position", last_position, torch.int64), ("valid", valid, torch.bool)):
            check_tensor(name, buf)
            if buf.shape != (batch,) or buf.dtype != dtype or buf.device != kmin.device:
                raise ValueError(f"{name} must be a {dtype} tensor of shape [B] = [{batch}] on {kmin.device}, "
                                 f"got {buf.dtype} {tuple(buf.shape)} on {buf.device}")
        self.last_position, self.valid = last_position, valid
        self.certify_skip = torch.zeros((batch,), dtype=torch.int32, device=kmin.device)

    @classmethod
    def allocate(
        cls,
        batch: int,
        kv_heads: int,
        max_seqlen: int,
        head_dim: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        moment_dtype: torch.dtype | None = None,
    ) -> "KVPageStats":
        """Zeroed buffers for a cache ``[batch, kv_heads, max_seqlen, head_dim]`` of ``dtype``;
        kmean/km2 in ``moment_dtype`` (None = float32; else float32 or ``dtype``)."""
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("max_seqlen", max_seqlen),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        page_size = check_page_size(page_size)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        moment_dtype = resolve_moment_dtype(moment_dtype, dtype)
        shape = (batch, kv_heads, num_pages_for(max_seqlen, page_size), head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=moment_dtype, device=device),
            torch.zeros(shape, dtype=moment_dtype, device=device),
            page_size,
        )

    @classmethod
    def from_cache(
        cls, k_cache: torch.Tensor, seqlens: torch.Tensor, page_size: int = 16, *, check_values: bool = True,
        moment_dtype: torch.dtype | None = None,
    ) -> "KVPageStats":
        """Allocate stats matching ``k_cache`` (moments in ``moment_dtype``, None = float32) and
        prefill them from its first ``seqlens`` rows."""
        check_kv_cache("k_cache", k_cache)
        batch, kv_heads, max_seqlen, head_dim = k_cache.shape
        stats = cls.allocate(batch, kv_heads, max_seqlen, head_dim, page_size, k_cache.dtype, k_cache.device,
                             moment_dtype=moment_dtype)
        stats.prefill(k_cache, seqlens, check_values=check_values)
        return stats

    @property
    def num_pages(self) -> int:
        """Page capacity ``ceil(Nmax / page_size)``."""
        return self.kmin.shape[2]

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kmin, kmax, kmean, km2)``, the argument order of the ops."""
        return self.kmin, self.kmax, self.kmean, self.km2

    def prefill(self, k_cache: torch.Tensor, seqlens: torch.Tensor, *, check_values: bool = True) -> None:
        """Recompute every page from the first ``seqlens[b]`` rows of ``k_cache`` (and mark the
        statistics valid, with ``last_position = seqlens - 1``)."""
        self.check_cache(k_cache)
        check_seqlens(seqlens, k_cache.shape[0], k_cache.shape[2], device=k_cache.device,
                      check_values=check_values)
        stats_prefill_(k_cache, seqlens, self.page_size, *self.buffers())
        stats_state_after_prefill_(seqlens, k_cache.shape[2], self.last_position, self.valid)

    def append(self, k_cache: torch.Tensor, positions: torch.Tensor, *, check_values: bool = True) -> None:
        """Fold the rows just written at ``positions`` (int ``[B]``) into their pages.

        With ``check_values`` (a host sync) an out-of-order append raises ``ValueError``; without,
        it only clears ``valid`` for that sequence (on device).
        """
        self.check_cache(k_cache)
        check_positions(positions, k_cache.shape[0], k_cache.shape[2], device=k_cache.device,
                        check_values=check_values)
        if check_values and has_values(positions):
            in_order = append_in_order(positions, self.last_position, self.page_size, k_cache.shape[2])
            if not bool(in_order.all()):
                b = int((~in_order).nonzero()[0, 0])
                raise ValueError(
                    f"positions must continue each sequence (last appended position + 1) or restart it "
                    f"at a page boundary (a multiple of page_size={self.page_size}) not beyond it; "
                    f"sequence {b} got position {int(positions[b])} after position "
                    f"{int(self.last_position[b])} (prefill again to rebuild the statistics)"
                )
        stats_append_(k_cache, positions, self.page_size, *self.buffers())
        stats_track_(positions, self.page_size, k_cache.shape[2], self.last_position, self.valid)

    def sequence_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(last_position, valid, certify_skip)``: the per-sequence decode state kept beside the
        four buffers, in the order the compiled graphs take it as inputs."""
        return self.last_position, self.valid, self.certify_skip

    def valid_for(self, seqlens: torch.Tensor) -> torch.Tensor:
        """bool ``[B]``: the statistics soundly describe the first ``seqlens`` rows (see
        :func:`stats_valid_for`); on device, no sync."""
        return stats_valid_for(self.last_position, self.valid, seqlens)

    def check_cache(self, k_cache: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``k_cache`` has the shape these stats describe."""
        check_kv_cache("k_cache", k_cache)
        batch, kv_heads, max_seqlen, head_dim = k_cache.shape
        expected = (batch, kv_heads, num_pages_for(max_seqlen, self.page_size), head_dim)
        if tuple(self.kmin.shape) != expected:
            raise ValueError(
                f"k_cache {tuple(k_cache.shape)} does not match these stats {tuple(self.kmin.shape)} "
                f"with page_size {self.page_size}"
            )
