"""Page statistics kernels: one-pass prefill, O(D) append and the rebuild of one page per sequence
(ops ``entmaxkv::triton_stats_*``).

Same arguments and in-place results as ``cache.stats_prefill_`` / ``cache.stats_append_`` /
``rolling.stats_rebuild_page_`` (the rebuild is the prefill kernel restricted to the page of a
given slot: a rolling buffer's written page).
Per page and KV head: ``kmin``/``kmax`` in K's dtype (2 x 2 bytes x D for fp16), ``kmean``/``km2``
in Welford form, stored as float32 (2 x 4 x D) or compactly in K's dtype (2 x 2 x D; arithmetic in
float32, only the stored value is rounded). The Quest bound and the certificate read only
kmin/kmax, the gaussian selector only kmean/km2.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ...checks import check_kernel_cache, check_kernel_stats, check_lengths, check_page_size, stats_shape
from .. import _common as cm
from ..paged import cache_geometry, check_block_table, check_pool, check_pool_stats, pool_stats_strides, table_args
from ..tuning.tuned import lookup
from .reference import m2_limit


@triton.jit
def saturated(m2, m2_max):
    """M2 clamped to its storage dtype's largest finite value ``m2_max`` (see
    ``reference.storable_m2``); NaN and +inf pass through."""
    return tl.where((m2 > m2_max) & (m2 < float("inf")), m2_max, m2)


@triton.jit
def _prefill_kernel(
    k_ptr, seqlens_ptr, kmin_ptr, kmax_ptr, kmean_ptr, km2_ptr,
    skb, skh, skn, skd, ssb, ssh, ssp, ssd,
    Hkv, D, num_pages, page_size, nmax, m2_max,
    table_ptr, stb, stp, HAS_TABLE: tl.constexpr,
    PAGES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    slot_ptr=None, ONE_PAGE: tl.constexpr = False,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    # clamped to the capacity: a length past Nmax (no value checks) must not read past the cache
    length = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b).to(tl.int32), 0), nmax)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    s_off = b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh + offs_d * ssd
    if HAS_TABLE:  # skb: the pool's block stride; ssb = 0 (statistics indexed by block, below)
        k_base = k_ptr + hk.to(tl.int64) * skh
    for i in range(PAGES):
        page = tl.program_id(0) * PAGES + i
        if ONE_PAGE:  # only the page holding row slot[b] (clamped into the cache)
            page = tl.minimum(tl.maximum(tl.load(slot_ptr + b).to(tl.int32), 0), nmax - 1) // page_size
        if page < num_pages:
            first = page * page_size
            n = tl.minimum(tl.maximum(length - first, 0), page_size)
            page_base = k_base
            stat_page = page
            written = dmask
            if HAS_TABLE:  # rows [0, n) of block table[b, page]; a page past the length (its
                # entry may be garbage: the loads below mask it out) is neither read nor written
                blk = tl.load(table_ptr + b * stb + page * stp).to(tl.int64)
                page_base = k_base + blk * skb - first.to(tl.int64) * skn
                stat_page = blk
                written = dmask & ((offs_d * 0 + n) > 0)
            lo = tl.full([BLOCK_D], float("inf"), tl.float32)
            hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
            total = tl.zeros([BLOCK_D], tl.float32)
            nans = tl.zeros([BLOCK_D], tl.int32)
            for t in range(0, n, BLOCK_T):
                rows = first + t + offs_t
                rmask = (t + offs_t) < n
                x = tl.load(page_base + rows.to(tl.int64)[:, None] * skn + offs_d[None, :] * skd,
                            mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                lo = tl.minimum(lo, tl.min(tl.where(rmask[:, None], x, float("inf")), axis=0))
                hi = tl.maximum(hi, tl.max(tl.where(rmask[:, None], x, float("-inf")), axis=0))
                nans += tl.sum((rmask[:, None] & (x != x)).to(tl.int32), axis=0)
                total += tl.sum(x, axis=0)
            # min/max reductions may skip NaN on a GPU; a NaN in K must reach the bound (and so
            # the certificate), as torch.amin/amax do in the reference
            lo = tl.where(nans > 0, float("nan"), lo)
            hi = tl.where(nans > 0, float("nan"), hi)
            mean = total / tl.maximum(n, 1).to(tl.float32)
            m2 = tl.zeros([BLOCK_D], tl.float32)
            for t in range(0, n, BLOCK_T):
                rows = first + t + offs_t
                rmask = (t + offs_t) < n
                x = tl.load(page_base + rows.to(tl.int64)[:, None] * skn + offs_d[None, :] * skd,
                            mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                dev = tl.where(rmask[:, None], x - mean[None, :], 0.0)
                m2 += tl.sum(dev * dev, axis=0)
            empty = n == 0
            off = s_off + stat_page.to(tl.int64) * ssp
            tl.store(kmin_ptr + off, tl.where(empty, 0.0, lo).to(kmin_ptr.dtype.element_ty),
                     mask=written)
            tl.store(kmax_ptr + off, tl.where(empty, 0.0, hi).to(kmax_ptr.dtype.element_ty),
                     mask=written)
            tl.store(kmean_ptr + off, mean.to(kmean_ptr.dtype.element_ty), mask=written)
            tl.store(km2_ptr + off, saturated(m2, m2_max).to(km2_ptr.dtype.element_ty), mask=written)


@triton.jit
def _append_kernel(
    k_ptr, pos_ptr, kmin_ptr, kmax_ptr, kmean_ptr, km2_ptr,
    skb, skh, skn, skd, ssb, ssh, ssp, ssd,
    Hkv, D, page_size, nmax, m2_max,
    table_ptr, stb, stp, HAS_TABLE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // Hkv
    hk = pid % Hkv
    raw = tl.load(pos_ptr + b).to(tl.int64)
    pos = tl.minimum(tl.maximum(raw, 0), nmax - 1)
    page = pos // page_size
    count = (pos % page_size + 1).to(tl.float32)
    fresh = count == 1.0
    offs_d = tl.arange(0, BLOCK_D)
    # a position outside [0, Nmax) (no value checks) reads and writes nothing
    raw_d = offs_d.to(tl.int64) * 0 + raw
    dmask = (offs_d < D) & (raw_d >= 0) & (raw_d < nmax)
    row_off = b.to(tl.int64) * skb + pos * skn
    stat_page = page
    if HAS_TABLE:  # row pos % P of block table[b, pos // P]; skb/ssb are block strides
        # (pos is clamped into the table; the row and statistics loads are masked by dmask)
        blk = tl.load(table_ptr + b * stb + page * stp).to(tl.int64)
        row_off = blk * skb + (pos % page_size) * skn
        stat_page = blk  # the launcher passes the statistics' batch stride ssb = 0
    row = tl.load(k_ptr + row_off + hk.to(tl.int64) * skh + offs_d * skd,
                  mask=dmask, other=0.0)
    off = b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh + stat_page * ssp + offs_d * ssd
    old_min = tl.load(kmin_ptr + off, mask=dmask, other=0.0).to(tl.float32)
    old_max = tl.load(kmax_ptr + off, mask=dmask, other=0.0).to(tl.float32)
    old_mean = tl.load(kmean_ptr + off, mask=dmask, other=0.0).to(tl.float32)
    old_m2 = tl.load(km2_ptr + off, mask=dmask, other=0.0).to(tl.float32)
    x = row.to(tl.float32)
    delta = x - old_mean
    mean = tl.where(fresh, x, old_mean + delta / count)
    m2 = tl.where(fresh, 0.0, old_m2 + delta * (x - mean))
    # min/max in fp32 (exact for K values) and cast back to K's dtype.
    # NaN-propagating min/max (GPU fmin/fmax would drop a NaN of K), as torch.minimum does.
    new_min = tl.minimum(old_min, x, propagate_nan=tl.PropagateNan.ALL)
    new_max = tl.maximum(old_max, x, propagate_nan=tl.PropagateNan.ALL)
    new_min = tl.where(fresh, x, new_min).to(kmin_ptr.dtype.element_ty)
    new_max = tl.where(fresh, x, new_max).to(kmax_ptr.dtype.element_ty)
    tl.store(kmin_ptr + off, new_min, mask=dmask)
    tl.store(kmax_ptr + off, new_max, mask=dmask)
    tl.store(kmean_ptr + off, mean.to(kmean_ptr.dtype.element_ty), mask=dmask)
    tl.store(km2_ptr + off, saturated(m2, m2_max).to(km2_ptr.dtype.element_ty), mask=dmask)


def _check_paged(k_pool: Tensor, block_table: Tensor, lengths_name: str, lengths: Tensor, page_size: int,
                 kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor) -> None:
    """A page pool, its table, ``[B]`` lengths or positions and per-block statistics agree."""
    check_pool("k_pool", k_pool, page_size)
    if not isinstance(lengths, Tensor) or lengths.dim() != 1:
        raise ValueError(f"{lengths_name} must be an int tensor [B]")
    check_block_table(block_table, lengths.shape[0], device=k_pool.device)
    check_lengths(lengths_name, lengths, lengths.shape[0], device=k_pool.device)
    blocks = check_pool_stats(block_table, k_pool.shape[2], k_pool.shape[3], kmin, kmax, kmean, km2)
    if blocks != k_pool.shape[0] or kmin.dtype != k_pool.dtype or kmax.dtype != k_pool.dtype:
        raise ValueError(f"the statistics must describe the pool's {k_pool.shape[0]} blocks in its dtype "
                         f"{k_pool.dtype}: got {blocks} blocks of {kmin.dtype}")


def _stat_strides(kmin: Tensor, kmean: Tensor, km2: Tensor, kmax: Tensor,
                  block_table: Optional[Tensor] = None) -> tuple[int, ...]:
    """The statistics' common ``(batch, head, page, dim)`` strides as the kernels address them
    (``paged.pool_stats_strides``)."""
    strides = kmin.stride()
    for name, buf in (("kmax", kmax), ("kmean", kmean), ("km2", km2)):
        if buf.stride() != strides:
            raise ValueError(f"{name} must have kmin's strides {strides}, got {buf.stride()}")
    return pool_stats_strides(kmin, block_table)


def _check_stat_update(k_cache: Tensor, name: str, rows: Tensor, page_size: int, kmin: Tensor, kmax: Tensor,
                       kmean: Tensor, km2: Tensor, block_table: Optional[Tensor]) -> None:
    """The inputs of a prefill or an append (``rows``: its lengths or positions, named ``name``):
    a contiguous cache with per-page statistics, or a pool and table with per-block ones."""
    check_page_size(page_size)
    if block_table is not None:
        _check_paged(k_cache, block_table, name, rows, page_size, kmin, kmax, kmean, km2)
        return
    check_kernel_cache("k_cache", k_cache)
    check_lengths(name, rows, k_cache.shape[0], device=k_cache.device)
    check_kernel_stats(kmin, kmax, kmean, km2, shape=stats_shape(k_cache, page_size),
                       dtype=k_cache.dtype, device=k_cache.device)


@triton_op("entmaxkv::triton_stats_prefill_",
           mutates_args={"kmin", "kmax", "kmean", "km2"})
def stats_prefill_(
    k_cache: Tensor, seqlens: Tensor, page_size: int,
    kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor, block_table: Optional[Tensor] = None,
) -> None:
    """Fill the four page-stat buffers from the first ``seqlens[b]`` rows of ``k_cache``. With
    ``block_table``, ``k_cache`` is a page pool and the statistics are per block (``runtime/paged.py``):
    each row's pages ``< ceil(seqlens[b] / P)`` write their block's statistics, no other block
    is touched."""
    _check_stat_update(k_cache, "seqlens", seqlens, page_size, kmin, kmax, kmean, km2, block_table)
    hkv, capacity, k_strides = cache_geometry(k_cache, page_size, block_table)
    batch, dim = seqlens.shape[0], k_cache.shape[3]
    num_pages = kmin.shape[2] if block_table is None else block_table.shape[1]
    strides = _stat_strides(kmin, kmean, km2, kmax, block_table)
    cfg = lookup("page_stats", k_cache.device, "default")
    pages_per_prog = 4
    grid = (cm.cdiv(num_pages, pages_per_prog), batch * hkv)
    wrap_triton(_prefill_kernel)[grid](
        k_cache, seqlens, kmin, kmax, kmean, km2, *k_strides, *strides,
        hkv, dim, num_pages, page_size, capacity, m2_limit(km2.dtype), *table_args(block_table, seqlens),
        PAGES=pages_per_prog, BLOCK_T=min(cfg["BLOCK_T"], cm.next_pow2(page_size)),
        BLOCK_D=cm.next_pow2(dim), num_warps=cfg["num_warps"],
    )


@triton_op("entmaxkv::triton_stats_append_",
           mutates_args={"kmin", "kmax", "kmean", "km2"})
def stats_append_(
    k_cache: Tensor, positions: Tensor, page_size: int,
    kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor, block_table: Optional[Tensor] = None,
) -> None:
    """Fold the row written at ``positions[b]`` into its page (reset when it starts a page).
    With ``block_table``: row ``positions[b] % P`` of the pool's block ``block_table[b,
    positions[b] // P]`` into that block's statistics (never a shared block: copy on write)."""
    _check_stat_update(k_cache, "positions", positions, page_size, kmin, kmax, kmean, km2, block_table)
    hkv, capacity, k_strides = cache_geometry(k_cache, page_size, block_table)
    batch, dim = positions.shape[0], k_cache.shape[3]
    strides = _stat_strides(kmin, kmean, km2, kmax, block_table)
    wrap_triton(_append_kernel)[(batch * hkv,)](
        k_cache, positions, kmin, kmax, kmean, km2, *k_strides, *strides,
        hkv, dim, page_size, capacity, m2_limit(km2.dtype), *table_args(block_table, positions),
        BLOCK_D=cm.next_pow2(dim), num_warps=1,
    )


@triton_op("entmaxkv::triton_stats_rebuild_page_",
           mutates_args={"kmin", "kmax", "kmean", "km2"})
def stats_rebuild_page_(
    k_cache: Tensor, slots: Tensor, seqlens: Tensor, page_size: int,
    kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor,
) -> None:
    """Recompute the statistics of the page holding row ``slots[b]`` from that page's rows below
    ``seqlens[b]`` (a rolling buffer's written page; O(P*D) per sequence and KV head)."""
    _check_stat_update(k_cache, "seqlens", seqlens, page_size, kmin, kmax, kmean, km2, None)
    check_lengths("slots", slots, k_cache.shape[0], device=k_cache.device)
    hkv, capacity, k_strides = cache_geometry(k_cache, page_size, None)
    batch, dim = seqlens.shape[0], k_cache.shape[3]
    strides = _stat_strides(kmin, kmean, km2, kmax)
    cfg = lookup("page_stats", k_cache.device, "default")
    wrap_triton(_prefill_kernel)[(1, batch * hkv)](
        k_cache, seqlens, kmin, kmax, kmean, km2, *k_strides, *strides,
        hkv, dim, kmin.shape[2], page_size, capacity, m2_limit(km2.dtype), *table_args(None, seqlens),
        PAGES=1, BLOCK_T=min(cfg["BLOCK_T"], cm.next_pow2(page_size)),
        BLOCK_D=cm.next_pow2(dim), slot_ptr=slots, ONE_PAGE=True, num_warps=cfg["num_warps"],
    )
