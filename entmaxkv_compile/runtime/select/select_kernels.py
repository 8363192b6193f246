"""Triton kernels of page scoring and selection (launched by ``select/kernel.py`` and ``certify/kernel.py``).

- ``quest_kernel`` (page block, batch x KV head): the Quest bound of every page for all G query
  heads of the group from one read of kmin/kmax (``u = scale (q+ . kmax + q- . kmin)`` plus the
  largest ALiBi bias in the page, soft-capped when ``SOFTCAP``); writes it per query head and/or
  the group max per KV head.
- ``moments_kernel`` (page block, batch x KV head): the gaussian page moments ``mu_p``,
  ``sigma_p`` for the G heads from one read of kmean/km2 (float32 or compact fp16/bf16, math in
  float32; one FMA reduction per head or G-row dots, ``DOT_MODE``), plus per-block
  count-weighted sums for the global Gaussian (fp64, law of total variance).
- ``dense_pages_kernel`` (slot block, batch x KV head): the dense selection, a contiguous
  range of pages, written directly.
- ``keep_kernel`` + ``compact_kernel`` (page block, batch x KV head): the gaussian keep
  rule (union over the group, forced pages; the single-Gaussian tau_hat solved in the same
  launch) with per-block counts, then a parallel compaction into
  the fixed-capacity ``page_indices`` (ascending, -1 padded) and ``num_selected``.

The top-k ranking itself is torch's multi-block top-k (``select.py``), not a kernel here.
``HAS_TABLE``: the statistics are per physical block and read at ``block_table[b, page]``
(``stat_pages``; ``runtime/paged.py``), only for the row's valid pages.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._softcap import soft_cap
from .tau_hat import single_gaussian_tau


@triton.jit
def _page_counts(pages, length, page_size, num_pages):
    n = tl.minimum(tl.maximum(length - pages * page_size, 0), page_size)
    return tl.where(pages < num_pages, n, 0)


@triton.jit
def _counts_from_start(n, pages, start_ptr, b, page_size):
    """Page counts ``n`` with the pages wholly below ``start[b]`` (a left-padded prefix) emptied;
    the page that straddles the start keeps its statistics' count."""
    first = tl.maximum(tl.load(start_ptr + b).to(tl.int32), 0) // page_size
    return tl.where(pages >= first, n, 0)


@triton.jit
def stat_pages(table_ptr, b, stb, stp, pages, mask, HAS_TABLE: tl.constexpr):
    """The page-axis index of the statistics of logical ``pages`` of row ``b``: the pages
    themselves, or with a block table their physical blocks (read only under ``mask``, so an
    entry past the row's pages is never touched; the launcher passes batch stride 0)."""
    blocks = pages
    if HAS_TABLE:
        blocks = tl.load(table_ptr + b * stb + pages * stp, mask=mask, other=0)
    return blocks


@triton.jit
def group_page_bounds(
    q_ptr, kmin_ptr, kmax_ptr, slopes_ptr, b, hk, pages, load_mask, length,
    sqb, sqh, sqd, ssb, ssh, ssp, ssd, G, D, page_size, scale, softcap,
    HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, blocks,
):
    """Quest bounds ``[BLOCK_G, BLOCK_P]`` of one page block for the G query heads of KV head
    ``hk``: ``scale (q+ . kmax + q- . kmin)`` plus the page's largest ALiBi bias, from one read of
    kmin/kmax (pages outside ``load_mask`` are not read; their bound is meaningless). ``SOFTCAP``:
    passed through ``softcap * tanh(u / softcap)``, an upper bound of the capped scores (the cap
    is increasing). ``blocks``: the page-axis index of the statistics (``stat_pages``)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < D
    heads = hk * G + offs_g
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    off = (b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh + blocks.to(tl.int64)[:, None] * ssp
           + offs_d[None, :] * ssd)
    lmask = load_mask[:, None] & dmask[None, :]
    kmx = tl.load(kmax_ptr + off, mask=lmask, other=0.0)
    kmn = tl.load(kmin_ptr + off, mask=lmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        kmx = kmx.to(tl.float32)
        kmn = kmn.to(tl.float32)
    q_pos = tl.where(q > 0, q, 0.0).to(q.dtype)
    q_neg = tl.where(q < 0, q, 0.0).to(q.dtype)
    u = tl.dot(q_pos, tl.trans(kmx), input_precision=DOT_PREC)
    u += tl.dot(q_neg, tl.trans(kmn), input_precision=DOT_PREC)
    u = u * scale
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=gmask, other=0.0).to(tl.float32)
        first = (pages * page_size - (length - 1)).to(tl.float32)
        last = (tl.minimum(pages * page_size + page_size - 1, length - 1) - (length - 1)).to(
            tl.float32)
        u += tl.maximum(slope[:, None] * first[None, :], slope[:, None] * last[None, :])
    if SOFTCAP:
        u = soft_cap(u, softcap)
    return u


@triton.jit
def quest_kernel(
    q_ptr, kmin_ptr, kmax_ptr, seqlens_ptr, slopes_ptr, bound_ptr, group_ptr,
    sqb, sqh, sqd, ssb, ssh, ssp, ssd,
    Hq, Hkv, G, D, num_pages, page_size, scale, softcap,
    table_ptr, stb, stp, HAS_TABLE: tl.constexpr,
    HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_HEADS: tl.constexpr, WRITE_GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    heads = hk * G + offs_g
    pages = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = _page_counts(pages, length, page_size, num_pages) > 0
    load = pages < num_pages
    if HAS_TABLE:  # a table entry past the row's pages may be garbage: read only valid pages
        load = valid
    u = group_page_bounds(q_ptr, kmin_ptr, kmax_ptr, slopes_ptr, b, hk, pages, load, length,
                          sqb, sqh, sqd, ssb, ssh, ssp, ssd, G, D, page_size, scale, softcap,
                          HAS_ALIBI, SOFTCAP, BLOCK_G, BLOCK_D, DOT_PREC, UPCAST,
                          stat_pages(table_ptr, b, stb, stp, pages, load, HAS_TABLE))
    u = tl.where(valid[None, :] & gmask[:, None], u, float("-inf"))
    if WRITE_HEADS:
        tl.store(bound_ptr + (b * Hq + heads[:, None]).to(tl.int64) * num_pages + pages[None, :],
                 u, mask=gmask[:, None] & (pages < num_pages)[None, :])
    if WRITE_GROUP:
        tl.store(group_ptr + pid_bh.to(tl.int64) * num_pages + pages, tl.max(u, axis=0),
                 mask=pages < num_pages)


@triton.jit
def moments_kernel(
    q_ptr, kmean_ptr, km2_ptr, seqlens_ptr, start_ptr, slopes_ptr, mu_ptr, sigma_ptr, mom_ptr,
    sqb, sqh, sqd, ssb, ssh, ssp, ssd,
    Hq, Hkv, G, D, num_pages, page_size, scale, blocks_per_prog,
    table_ptr, stb, stp, HAS_TABLE: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_START: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, DOT_MODE: tl.constexpr, UPCAST: tl.constexpr,
):
    """Page moments (mu, sigma) of ``blocks_per_prog`` consecutive page blocks for the G heads of
    a KV head, and the program's count-weighted sums of them (float64) for the single-Gaussian
    tau_hat. A program walks several blocks so that the next block's loads overlap this block's
    reductions (one block per program left the H200 at ~2.3 TB/s). ``HAS_START``: the pages wholly
    below the row's first attended position count as empty (:func:`_counts_from_start`).

    ``DOT_MODE``: 0, one FMA reduction over D per head; 1, G-row dots in three tf32 passes
    (float32-accurate); 2, one tensor-core pass each: ``q . mean`` in the moments' own dtype
    (fp16/bf16 products are exact in the float32 accumulator; float32 moments round to tf32) and
    the variance term in tf32 (10-bit inputs: the selection is an estimate, not a bound).
    ``UPCAST``: the interpreter's bf16 dot is wrong, so mode 2 runs in float32 there."""
    prog = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    if length == 0:  # nothing to select (a certified step reading densely): the tau_hat solves
        return  # skip this row too (its sums are never read), and keep_kernel reads nothing past the length
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < D
    heads = hk * G + offs_g
    if DOT_MODE > 0:
        q_raw = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd,
                        mask=gmask[:, None] & dmask[None, :], other=0.0)
        q = q_raw.to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=gmask, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_G], tl.float64)
    s2 = tl.zeros([BLOCK_G], tl.float64)
    pages = prog * blocks_per_prog * BLOCK_P + tl.arange(0, BLOCK_P)
    blocks = stat_pages(table_ptr, b, stb, stp, pages,
                        _page_counts(pages, length, page_size, num_pages) > 0, HAS_TABLE)
    for it in range(0, blocks_per_prog):
        pages = (prog * blocks_per_prog + it) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = _page_counts(pages, length, page_size, num_pages)
        if HAS_START:
            n = _counts_from_start(n, pages, start_ptr, b, page_size)
        valid = n > 0
        nf = n.to(tl.float32)
        off = (b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh + blocks.to(tl.int64)[:, None] * ssp
               + offs_d[None, :] * ssd)
        lmask = valid[:, None] & dmask[None, :]
        mean_raw = tl.load(kmean_ptr + off, mask=lmask, other=0.0)
        mean = mean_raw.to(tl.float32)
        m2 = tl.load(km2_ptr + off, mask=lmask, other=0.0).to(tl.float32)
        # the next block's table entries now: their latency hides behind this block's math
        ahead = pages + BLOCK_P
        blocks = stat_pages(table_ptr, b, stb, stp, ahead,
                            _page_counts(ahead, length, page_size, num_pages) > 0, HAS_TABLE)
        inv_n = 1.0 / tl.maximum(nf, 1.0)
        if HAS_ALIBI:  # a page's positions: their mean and variance (uniform over n rows)
            mean_pos = (pages * page_size - (length - 1)).to(tl.float32) + (nf - 1.0) * 0.5
            pos_var = (nf * nf - 1.0) / 12.0
        if DOT_MODE == 0:
            # One FMA reduction over D per head: no padding of G to a 16-row dot. (Finishing and
            # storing each head's row on its own, without the [G, P] assembly, measured slower
            # on the H200: 115 -> 180 us at 1M; so did [P, G] results laid out as the tile, with
            # the float64 sums kept per page until the end: 246 registers, 116 -> 161 us.)
            mu = tl.zeros([BLOCK_G, BLOCK_P], tl.float32)
            vs = tl.zeros([BLOCK_G, BLOCK_P], tl.float32)
            for g in tl.static_range(BLOCK_G):
                qg = tl.load(q_ptr + b * sqb + (hk * G + g) * sqh + offs_d * sqd,
                             mask=dmask & ((offs_d * 0 + g) < G), other=0.0).to(tl.float32)
                mu_g = tl.sum(mean * qg[None, :], axis=1) * scale
                vs_g = tl.sum(m2 * (qg * qg)[None, :], axis=1) * inv_n * (scale * scale)
                mu = tl.where(offs_g[:, None] == g, mu_g[None, :], mu)
                vs = tl.where(offs_g[:, None] == g, vs_g[None, :], vs)
        elif DOT_MODE == 2:
            if UPCAST:
                mu = tl.dot(q, tl.trans(mean), input_precision="ieee") * scale
            else:
                mu = tl.dot(q_raw.to(mean_raw.dtype), tl.trans(mean_raw), input_precision="tf32") * scale
            # 1/n on the [G, P] result, not on the [P, D] tile before the dot
            vs = tl.dot(q * q, tl.trans(m2), input_precision=DOT_PREC) * (inv_n * (scale * scale))[None, :]
        else:
            mu = tl.dot(q, tl.trans(mean), input_precision=DOT_PREC) * scale
            vs = tl.dot(q * q, tl.trans(m2 * inv_n[:, None]), input_precision=DOT_PREC) * (scale * scale)
        if HAS_ALIBI:
            mu += slope[:, None] * mean_pos[None, :]
            vs += (slope * slope)[:, None] * pos_var[None, :]
        mu = tl.where(valid[None, :], mu, 0.0)
        sigma = tl.where(valid[None, :], tl.sqrt(tl.maximum(vs, 0.0)), 0.0)
        rows = (b * Hq + heads[:, None]).to(tl.int64) * num_pages + pages[None, :]
        smask = gmask[:, None] & (pages < num_pages)[None, :]
        tl.store(mu_ptr + rows, mu, mask=smask)
        tl.store(sigma_ptr + rows, sigma, mask=smask)
        w = nf.to(tl.float64)[None, :]
        mu64 = mu.to(tl.float64)
        sg64 = sigma.to(tl.float64)
        s1 += tl.sum(w * mu64, axis=1)
        s2 += tl.sum(w * (sg64 * sg64 + mu64 * mu64), axis=1)
    mom = mom_ptr + ((b * Hq + heads).to(tl.int64) * tl.num_programs(0) + prog) * 2
    tl.store(mom, s1, mask=gmask)
    tl.store(mom + 1, s2, mask=gmask)


@triton.jit
def keep_kernel(
    mu_ptr, sigma_ptr, tau_ptr, ztab_ptr, seqlens_ptr, start_ptr, flag_ptr, count_ptr,
    Hq, Hkv, G, num_pages, page_size, am1, margin, sink, recent, min_context,
    mom_ptr, num_mom_blocks, log_gamma, log_m0,
    HAS_START: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    SOLVE: tl.constexpr, BETA: tl.constexpr, BLOCK_B: tl.constexpr, MAX_IT: tl.constexpr,
):
    """Gaussian keep flags of one page block (union over the group, forced pages) and the
    block's count, for the parallel compaction. ``SOLVE`` (the single-Gaussian tau_hat): each
    program solves its group's tau_hat from the moments kernel's sums
    (:func:`tau_hat.single_gaussian_tau`) while its page moments load, instead of a launch of
    its own before this one; without it tau_hat is read from ``tau_ptr`` (the mixture's)."""
    blk = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    pages = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    heads = hk * G + offs_g
    prow = (b * Hq + heads[:, None]).to(tl.int64) * num_pages + pages[None, :]
    # Loaded beside the length, not after it (a round trip less): the moments kernel wrote every
    # page below num_pages, and what lies past the length is masked out below.
    inside = gmask[:, None] & (pages < num_pages)[None, :]
    mu = tl.load(mu_ptr + prow, mask=inside, other=0.0)
    sg = tl.load(sigma_ptr + prow, mask=inside, other=0.0)
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    last = (length - 1) // page_size
    n = _page_counts(pages, length, page_size, num_pages)
    if HAS_START:  # pages wholly below the start are neither kept nor forced
        n = _counts_from_start(n, pages, start_ptr, b, page_size)
    valid = n > 0
    forced = (pages == last) | (pages < sink) | ((pages >= last - recent) & (pages < last))
    keep = forced | (length < min_context)
    pm = gmask[:, None] & valid[None, :]
    z = tl.load(ztab_ptr + tl.maximum(n - 1, 0), mask=valid, other=0.0)
    if SOLVE:
        tau = single_gaussian_tau(mom_ptr, length, start_ptr, b, heads, gmask, Hq, num_mom_blocks,
                                  am1, page_size, log_gamma, log_m0, HAS_START, BETA, BLOCK_B, MAX_IT)
    else:
        tau = tl.load(tau_ptr + b * Hq + heads, mask=gmask, other=float("inf"))
    thr = tl.where(gmask, tau, float("inf")) - margin
    likely_max = am1 * (mu + z[None, :] * sg)
    # non-finite moments (NaN/inf in K, q or the slope): keep the page, as the reference
    wild = (likely_max != likely_max) | (tl.abs(likely_max) == float("inf"))
    hit = ((likely_max > thr[:, None]) | wild) & pm
    keep = keep | (tl.max(hit.to(tl.int32), axis=0) > 0)
    flags = ((keep & valid) != 0).to(tl.int8)
    tl.store(flag_ptr + pid.to(tl.int64) * num_pages + pages, flags, mask=pages < num_pages)
    tl.store(count_ptr + pid * tl.num_programs(0) + blk, tl.sum(flags.to(tl.int32), axis=0))


@triton.jit
def dense_pages_kernel(
    seqlens_ptr, start_ptr, idx_ptr, nsel_ptr, Hkv, num_pages, page_size,
    HAS_START: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The dense selection of one block of slots: every valid page from the row's first attended
    one on is a contiguous range ``[first, end)``, so slot ``s`` holds ``first + s`` (then -1) and
    the total goes to ``nsel`` (block 0): one launch where flags and a compaction took two."""
    blk = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // Hkv
    length = tl.maximum(tl.load(seqlens_ptr + b).to(tl.int64), 0)
    end = tl.minimum((length + page_size - 1) // page_size, num_pages).to(tl.int32)
    first = tl.zeros([], tl.int32)
    if HAS_START:  # pages wholly below the start are not valid (as _counts_from_start)
        first = tl.maximum(tl.load(start_ptr + b).to(tl.int32), 0) // page_size
    count = tl.maximum(end - first, 0)
    slots = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    tl.store(idx_ptr + pid.to(tl.int64) * num_pages + slots, tl.where(slots < count, first + slots, -1),
             mask=slots < num_pages)
    if blk == 0:
        tl.store(nsel_ptr + pid, count)


@triton.jit
def compact_kernel(
    flag_ptr, count_ptr, idx_ptr, nsel_ptr, num_pages,
    BLOCK_P: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """Writes the kept page ids of one block at its offset (the sum of the earlier blocks'
    counts), -1 into its slots past the total, and the total (block 0)."""
    blk = tl.program_id(0)
    pid = tl.program_id(1)
    nblocks = tl.num_programs(0)
    offs_nb = tl.arange(0, BLOCK_NB)
    counts = tl.load(count_ptr + pid * nblocks + offs_nb, mask=offs_nb < nblocks, other=0)
    total = tl.sum(counts, axis=0)
    offset = tl.sum(tl.where(offs_nb < blk, counts, 0), axis=0)
    pages = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = pages < num_pages
    row = pid.to(tl.int64) * num_pages
    keep = tl.load(flag_ptr + row + pages, mask=inside, other=0).to(tl.int32)
    pos = offset + tl.cumsum(keep, axis=0) - keep
    tl.store(idx_ptr + row + pos, pages, mask=keep > 0)
    tl.store(idx_ptr + row + pages, tl.full([BLOCK_P], -1, tl.int32),
             mask=inside & (pages >= total))
    if blk == 0:
        tl.store(nsel_ptr + pid, total)
