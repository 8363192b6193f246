"""Triton kernels of the fused sparse entmax decode (launched by ``kernel.py``).

One decode step is a fixed sequence of launches over fixed grids:

1. ``score_kernel`` (batch x KV head, split): reads each selected K page once, scores it for all
   G query heads of the group with one ``tl.dot``, adds ALiBi, soft-caps the scores when
   ``SOFTCAP`` (``z = (alpha-1) cap tanh(s / cap)``), masks the rows below the sequence's first
   attended position when ``HAS_START`` (a left-padded prefix: never a candidate, so never in
   the support), and keeps the *candidates*: tokens
   whose score is above (max - 1) for some head of the group. Only candidates can be in the
   support, since tau >= max z - 1. The max is the largest seen so far by *any* split: every
   ``SHARE_EVERY`` tiles (a tuned launch parameter; 0 = each split alone) a split publishes its
   heads' maxima with an atomic max and reads back the others', so after the first tiles every
   split filters against nearly the global max (on iid keys at 128k tokens this keeps
   ~5% of the tokens instead of ~55% with each split's own running max). Candidates' scores
   (4 bytes per head) and row ids are compacted into a per-split segment; the split's own max per
   head is written too. Which extra candidates a split keeps depends on timing; nothing
   downstream depends on them (the tau levels and the output compact the tokens that matter
   first, in token order), so results are bitwise reproducible.
2. the exact threshold in two launches (``tau_kernels.py``).
3. ``output_kernel`` (batch x KV head, split): compacts the split's candidates in the support of
   some head of the group (z > tau), then p = [z - tau]_+^beta over that list, V rows loaded once
   per group, partial sum p.v and sum p in fp32.
4. ``reduce_kernel`` (batch x query head): sums the split partials in a fixed order
   (deterministic, no atomics) and normalizes by sum p; it also writes the step's verdict when
   nothing but the decode decides it (every page read, or no bound asked for).

Lengths, counts and strides are runtime arguments; only block sizes, the page size (``PAGE``:
the K and V passes split every row index into page and offset, which is a shift for a constant and
~20 instructions per row for a runtime divisor), the alpha fast path and feature flags are
constexpr, so the kernels never recompile as a cache grows. ``HAS_TABLE``: K and
V are page pools read through a block table (``runtime/paged.py``); pages and candidate rows stay
logical, only the K and V addresses go through the table.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._softcap import soft_cap

@triton.jit
def _tail_power(x, beta, KIND: tl.constexpr):
    """[x]_+ ** beta (fast paths for beta = 1 and 2)."""
    pos = x > 0
    if KIND == 1:  # sparsemax: beta = 1
        p = tl.where(pos, x, 0.0)
    elif KIND == 2:  # entmax15: beta = 2
        p = tl.where(pos, x * x, 0.0)
    else:
        p = tl.where(pos, tl.exp2(beta * tl.log2(tl.where(pos, x, 1.0))), 0.0)
    return p


@triton.jit
def _k_tile_by_slot(k_base, idx_base, blocks_base, j, j1, readable, first, sip, sbs, skb, skn, skd,
                    dmask, offs_d, HAS_TABLE: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """``(k [BLOCK_N, BLOCK_D], row, valid [BLOCK_N])`` of the K tile at selected row ``j`` (a
    multiple of ``PAGE``, which divides ``BLOCK_N``), loaded as ``[slots, PAGE, D]``: each
    selected page's id (and block) is loaded once per slot and its rows are offsets from one base,
    where the row-wise form loads both for every row and builds every row's address from them."""
    SLOTS: tl.constexpr = BLOCK_N // PAGE
    slot = j // PAGE + tl.arange(0, SLOTS)
    in_split = slot * PAGE < j1
    page = tl.load(idx_base + slot * sip, mask=in_split, other=-1)
    within = tl.arange(0, PAGE)
    if HAS_TABLE:
        base = tl.load(blocks_base + slot * sbs, mask=in_split, other=0).to(tl.int64) * skb
    else:
        base = (page * PAGE).to(tl.int64) * skn
    row2 = page[:, None] * PAGE + within[None, :]
    valid2 = (in_split & (page >= 0))[:, None] & (row2 < readable) & (row2 >= first)
    offs = base[:, None, None] + (within.to(tl.int64) * skn)[None, :, None] + (offs_d * skd)[None, None, :]
    k3 = tl.load(k_base + offs, mask=valid2[:, :, None] & dmask[None, None, :], other=0.0)
    return (tl.reshape(k3, (BLOCK_N, BLOCK_D)), tl.reshape(row2, (BLOCK_N,)),
            tl.reshape(valid2, (BLOCK_N,)))


@triton.jit
def score_kernel(
    q_ptr, k_ptr, seqlens_ptr, start_ptr, idx_ptr, nsel_ptr, slopes_ptr,
    cand_z_ptr, cand_tok_ptr, cand_cnt_ptr, split_max_ptr, shared_max_ptr,
    sqb, sqh, sqd, skb, skh, skn, skd, sib, sih, sip, snb, snh,
    Hq, Hkv, G, D, num_splits, seg, min_split_pages, zscale, am1, capacity, zcap,
    blocks_ptr, sbb, sbh, sbs, HAS_TABLE: tl.constexpr, PAGE: tl.constexpr,
    HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, HAS_START: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    SHARE_EVERY: tl.constexpr, SLOT_TILES: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    # Rows past the cache's capacity are never read, whatever length says (ALiBi keeps the raw
    # length, as the reference does).
    readable = tl.minimum(tl.maximum(length, 0), capacity)
    first = 0
    if HAS_START:  # rows below the start (left padding) are never read
        first = tl.load(start_ptr + b).to(tl.int32)
    nsel = tl.load(nsel_ptr + b * snb + hk * snh).to(tl.int32)
    # At least min_split_pages per split: a small selection fills the first splits and leaves the
    # rest empty (no candidates for the threshold and V passes to walk), a large one spreads
    # over all of them.
    pages_per_split = tl.maximum((nsel + num_splits - 1) // num_splits, min_split_pages)
    p0 = tl.minimum(split * pages_per_split, nsel)
    p1 = tl.minimum(p0 + pages_per_split, nsel)
    j0 = p0 * PAGE
    j1 = p1 * PAGE

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < D
    heads = hk * G + offs_g
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=gmask, other=0.0).to(tl.float32) * am1

    cap = num_splits * seg
    tok_base = cand_tok_ptr + pid_bh.to(tl.int64) * cap + split * seg
    z_base = cand_z_ptr + (b * Hq + heads[:, None]).to(tl.int64) * cap + split * seg
    k_base = k_ptr + hk.to(tl.int64) * skh
    if not HAS_TABLE:  # with a table, skb is the pool's block stride (see the loop)
        k_base += b.to(tl.int64) * skb
    idx_base = idx_ptr + b * sib + hk * sih

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    seen = tl.full([BLOCK_G], float("-inf"), tl.float32)  # the other splits' maxima so far
    nonfinite = tl.zeros([BLOCK_G], tl.int32)
    count = tl.zeros([], tl.int32)
    for j in range(j0, j1, BLOCK_N):
        if SLOT_TILES:
            k, row, valid = _k_tile_by_slot(k_base, idx_base, blocks_ptr + b * sbb + hk * sbh, j, j1,
                                            readable, first, sip, sbs, skb, skn, skd, dmask, offs_d,
                                            HAS_TABLE, PAGE, BLOCK_N, BLOCK_D)
        else:
            jj = j + offs_n
            nmask = jj < j1
            slot = jj // PAGE  # the selected page's slot, and the row within the page
            within = jj % PAGE
            page = tl.load(idx_base + slot * sip, mask=nmask, other=0)
            row = page * PAGE + within
            valid = nmask & (row < readable) & (row >= first) & (page >= 0)
            k_row = row.to(tl.int64) * skn
            if HAS_TABLE:  # the selected page's block, loaded beside the page, not after it
                blk = tl.load(blocks_ptr + b * sbb + hk * sbh + slot * sbs, mask=nmask,
                              other=0).to(tl.int64)
                k_row = blk * skb + within.to(tl.int64) * skn
            k = tl.load(k_base + k_row[:, None] + offs_d[None, :] * skd,
                        mask=valid[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        z = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * zscale
        if HAS_ALIBI:
            z += slope[:, None] * (row - (length - 1)).to(tl.float32)[None, :]
        if SOFTCAP:  # z = (alpha-1) s here, so (alpha-1) cap tanh(s/cap) = zcap tanh(z/zcap)
            z = soft_cap(z, zcap)
        z = tl.where(valid[None, :] & gmask[:, None], z, float("-inf"))
        # An attended NaN or +inf score makes the head's result NaN (docs/EDGE_INPUTS.md): flag
        # it, and keep it out of the max and the candidates.
        bad = (z != z) | (z == float("inf"))
        nonfinite = tl.maximum(nonfinite, tl.max(bad.to(tl.int32), axis=1))
        z = tl.where(bad, float("-inf"), z)
        m = tl.maximum(m, tl.max(z, axis=1))
        top = tl.maximum(m, seen)
        thr = tl.where(top > float("-inf"), top - 1.0, float("inf"))
        keep = tl.max((z > thr[:, None]).to(tl.int32), axis=0)
        kept = tl.sum(keep, axis=0)
        # Past the first tiles most hold no candidate: no scan, no stores (1M tokens, planted
        # keys on an H200: 0.665 -> 0.582 ms).
        if kept > 0:
            pos = count + tl.cumsum(keep, axis=0) - keep
            keep_b = keep > 0
            tl.store(tok_base + pos, row, mask=keep_b)
            tl.store(z_base + pos[None, :], z, mask=keep_b[None, :] & gmask[:, None])
        count += kept
        if SHARE_EVERY > 0:
            # Every SHARE_EVERY tiles: publish this split's max where it grew (a predicated
            # atomic, no traffic when nothing grew, so the 100+ splits of a head do not queue
            # on one address), and read the others' from L2. Used from the next tile on, so the
            # round trip overlaps the next K load. (An atomic under a branch here miscompiled
            # on the H200 with Triton 3.6; masks keep it branch-free.)
            refresh = ((offs_g * 0 + (j - j0) // BLOCK_N) % SHARE_EVERY) == 0
            shared = shared_max_ptr + b * Hq + heads
            tl.atomic_max(shared, m, mask=gmask & refresh & (m > seen))
            got = tl.load(shared, mask=gmask & refresh, other=float("-inf"), cache_modifier=".cg")
            seen = tl.maximum(tl.maximum(seen, got), m)
    close_split(cand_cnt_ptr, split_max_ptr, pid_bh, split, num_splits, count, m, nonfinite,
                b, Hq, heads, gmask)


@triton.jit
def close_split(cand_cnt_ptr, split_max_ptr, pid_bh, split, num_splits, count, m, nonfinite,
                b, Hq, heads, gmask):
    """Store a split's candidate count and its heads' maxima for the tau levels, NaN for a head
    that met a non-finite score (the levels read it as a poisoned head)."""
    tl.store(cand_cnt_ptr + pid_bh * num_splits + split, count)
    m = tl.where(nonfinite > 0, float("nan"), m)
    tl.store(split_max_ptr + (b * Hq + heads) * num_splits + split, m, mask=gmask)


@triton.jit
def _store_live(z, live, tok, n, live_tok, live_z, gmask, table_ptr, b, stb, stp,
                HAS_TABLE: tl.constexpr, PAGE: tl.constexpr):
    """Append the tile's candidates in the support of some head (``live``), their scores ``z``
    ``[G, T]`` and rows ``tok``, to the live lists after their first ``n`` entries, in order."""
    pos = n + tl.cumsum(live, axis=0) - live
    keep = live > 0
    if HAS_TABLE:  # keep the physical row (block * PAGE + offset): the table lookup happens
        # here, off the V loads' critical path
        blk = tl.load(table_ptr + b * stb + (tok // PAGE) * stp, mask=keep, other=0)
        tok = blk * PAGE + tok % PAGE
    tl.store(live_tok + pos, tok, mask=keep)
    tl.store(live_z + pos[None, :], z, mask=keep[None, :] & gmask[:, None])


@triton.jit
def output_kernel(
    v_ptr, cand_z_ptr, cand_tok_ptr, cand_cnt_ptr, tau_ptr, live_z_ptr, live_tok_ptr,
    o_part_ptr, l_part_ptr,
    svb, svh, svn, svd,
    Hq, Hkv, G, D, num_splits, seg, beta,
    table_ptr, stb, stp, HAS_TABLE: tl.constexpr, PAGE: tl.constexpr,
    KIND: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_SCAN: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    cap = num_splits * seg
    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, BLOCK_T)
    offs_scan = tl.arange(0, BLOCK_SCAN)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < D
    heads = hk * G + offs_g
    tau = tl.load(tau_ptr + b * Hq + heads, mask=gmask, other=float("inf"))
    count = tl.load(cand_cnt_ptr + pid_bh * num_splits + split)
    seg_off = split * seg
    tok_base = cand_tok_ptr + pid_bh.to(tl.int64) * cap + seg_off
    z_base = cand_z_ptr + (b * Hq + heads[:, None]).to(tl.int64) * cap + seg_off
    live_tok = live_tok_ptr + pid_bh.to(tl.int64) * cap + seg_off
    live_z = live_z_ptr + (b * Hq + heads[:, None]).to(tl.int64) * cap + seg_off
    v_base = v_ptr + hk.to(tl.int64) * svh
    if not HAS_TABLE:  # with a table, svb is the pool's block stride (see the loop)
        v_base += b.to(tl.int64) * svb

    # 1. The candidates in the support of some head of the group, in token order: the sums
    # below then group the same tokens into the same tiles whatever else the K pass kept. Wide
    # tiles: on flat keys most tokens are candidates and this loop streams them.
    # The first tile (all that most splits of a small selection hold) is loaded with tau and the
    # count, masked by the segment and then by the count: loaded after the count, its scores and
    # then its rows were two more round trips on a kernel that is latency, not bytes.
    # (Its names are its own: the loops below must not carry them as loop variables.)
    z_first = tl.load(z_base + offs_scan[None, :], mask=gmask[:, None] & (offs_scan < seg)[None, :],
                      other=float("-inf"))
    tok_first = tl.load(tok_base + offs_scan, mask=offs_scan < seg, other=0)
    z_first = tl.where((offs_scan < count)[None, :], z_first, float("-inf"))
    live_first = tl.max((z_first > tau[:, None]).to(tl.int32), axis=0)
    n = tl.sum(live_first, axis=0)
    if n > 0:
        _store_live(z_first, live_first, tok_first, 0, live_tok, live_z, gmask, table_ptr, b, stb, stp,
                    HAS_TABLE, PAGE)
    for t in range(BLOCK_SCAN, count, BLOCK_SCAN):
        tt = t + offs_scan
        tmask = tt < count
        z = tl.load(z_base + tt[None, :], mask=gmask[:, None] & tmask[None, :],
                    other=float("-inf"))
        live = tl.max((z > tau[:, None]).to(tl.int32), axis=0)
        found = tl.sum(live, axis=0)
        # On flat keys most candidates lie below tau: no scan, no stores for such tiles.
        if found > 0:
            tok = tl.load(tok_base + tt, mask=live > 0, other=0)
            _store_live(z, live, tok, n, live_tok, live_z, gmask, table_ptr, b, stb, stp, HAS_TABLE, PAGE)
        n += found
    tl.debug_barrier()  # the loop below reads what the other threads just wrote

    # 2. p . v over that list.
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    for t in range(0, n, BLOCK_T):
        tt = t + offs_t
        tmask = tt < n
        z = tl.load(live_z + tt[None, :], mask=gmask[:, None] & tmask[None, :],
                    other=float("-inf"))
        p = _tail_power(z - tau[:, None], beta, KIND)
        tok = tl.load(live_tok + tt, mask=tmask, other=0)
        v_row = tok.to(tl.int64) * svn
        if HAS_TABLE:  # physical rows (see above)
            v_row = (tok // PAGE).to(tl.int64) * svb + (tok % PAGE).to(tl.int64) * svn
        v = tl.load(v_base + v_row[:, None] + offs_d[None, :] * svd,
                    mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(p, v, input_precision=DOT_PREC)
        l_sum += tl.sum(p, axis=1)
    row = (b * Hq + heads) * num_splits + split
    tl.store(o_part_ptr + row[:, None] * D + offs_d[None, :], acc,
             mask=gmask[:, None] & dmask[None, :])
    tl.store(l_part_ptr + row, l_sum, mask=gmask)


@triton.jit
def split_sums(o_part_ptr, l_part_ptr, pid, D, num_splits, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query head's unnormalised ``sum p v`` (``[BLOCK_D]``) and ``sum p`` over the output
    pass's splits (``o_part [heads, splits, D]``, ``l_part [heads, splits]``)."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < num_splits
    o = tl.load(o_part_ptr + (pid * num_splits + offs_s)[:, None] * D + offs_d[None, :],
                mask=smask[:, None] & (offs_d < D)[None, :], other=0.0)
    l_sum = tl.sum(tl.load(l_part_ptr + pid * num_splits + offs_s, mask=smask, other=0.0), axis=0)
    return tl.sum(o, axis=0), l_sum


@triton.jit
def reduce_kernel(
    o_part_ptr, l_part_ptr, tau_ptr, out_ptr, certified_ptr, delta_ptr, sob, soh, sod,
    Hq, D, num_splits,
    READ_ALL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query head's output, and what the decode proves by itself about it (``certified``,
    ``delta``; see ``reference.decode_verdict``), written here rather than by two small launches
    after the step."""
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    offs_d = tl.arange(0, BLOCK_D)
    o_sum, l_sum = split_sums(o_part_ptr, l_part_ptr, pid, D, num_splits, BLOCK_S, BLOCK_D)
    res = o_sum / tl.where(l_sum > 0, l_sum, 1.0)
    tau = tl.load(tau_ptr + pid)
    res = tl.where(tau != tau, float("nan"), res)  # a poisoned head reports NaN, not a value
    tl.store(out_ptr + b * sob + h * soh + offs_d * sod, res.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)
    # every valid page read: full entmax wherever tau is finite (not NaN, not +inf = no token)
    certified = (tau < float("inf")) & READ_ALL
    tl.store(certified_ptr + pid, certified)
    tl.store(delta_ptr + pid, tl.where(certified, 0.0, 1.0))


@triton.jit
def blocks_kernel(page_ptr, table_ptr, out_ptr, Hkv, S, stb, stp, BLOCK: tl.constexpr):
    """One (sequence x KV head, run of ``BLOCK`` slots): the physical block of each selected page,
    ``table[b, page]``, -1 where no page is selected (``runtime/paged.py``'s ``selected_blocks``
    in one launch instead of five small torch ops)."""
    pid_bh = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    page = tl.load(page_ptr + pid_bh * S + offs, mask=mask, other=-1)
    block = tl.load(table_ptr + (pid_bh // Hkv) * stb + page.to(tl.int64) * stp, mask=mask & (page >= 0), other=-1)
    tl.store(out_ptr + pid_bh * S + offs, block, mask=mask)
