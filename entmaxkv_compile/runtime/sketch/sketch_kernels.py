"""Triton kernels of the int8 key sketch (launched by ``sketch/kernel.py``).

- ``prefill_kernel`` (row block, batch x KV head) and ``append_kernel`` (batch x KV head): quantise
  K rows into int8 codes and bfloat16 scales exactly as ``reference.quantize_rows`` does (IEEE
  round-to-nearest divisions, the same rounding of the scale up to bfloat16, the same NaN rule),
  so codes and scales equal the reference's bit for bit.
- ``bounds_kernel`` (batch x KV head, page block): the sketch upper bound of each candidate
  page's largest score for all G query heads of the group, from one read of the page's codes
  and scales; a page that is not a candidate, or holds no valid token, loads nothing and gets
  ``-inf``. Dot products are float32 FMA reductions (never tensor-core tf32), because the
  bound's rounding slack assumes float32 arithmetic (see ``reference.py``).
- ``scan_kernel`` (batch x KV head, split) and ``keep_kernel`` (page block, batch x KV head): the
  certified selection from the whole sketch (``kernel.sketch_select``): page upper bounds and the
  lower bounds that can reach the threshold in one read, then, once the decode's threshold solve
  has turned the lower bounds into the floor, the pages to read. The scan's dots run on tensor
  cores, exact for 16-bit q (see ``_grouped_scaled_dots``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..attend.decode_kernels import close_split

GROUP = 32  # channels per scale group (checks.SKETCH_GROUP)


@triton.jit
def _round_scale_up(s32):
    """The float32 quotient ``absmax / 127`` -> a float32 value exact in bfloat16 and never
    below the exact quotient (one ulp up, then the next bfloat16 up); 0, inf and NaN stay."""
    bits = s32.to(tl.int32, bitcast=True)
    up = ((bits + 0x10000) & -0x10000).to(tl.float32, bitcast=True)
    keep = (s32 == 0) | (s32 != s32) | (tl.abs(s32) == float("inf"))
    return tl.where(keep, s32, up)


@triton.jit
def _quantize_rows(k_base, codes_base, scales_base, rows, load_mask, store_mask,
                   skn, skd, scn, scd, ssn, ssg, D,
                   GROUPS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Quantise rows ``rows`` (loaded where ``load_mask``, zeros elsewhere) and store them where
    ``store_mask``: one 32-channel group at a time."""
    offs_c = tl.arange(0, 32)
    for g in tl.static_range(GROUPS):
        ch = g * 32 + offs_c
        cmask = ch < D
        x = tl.load(k_base + rows.to(tl.int64)[:, None] * skn + ch[None, :] * skd,
                    mask=load_mask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        # max reductions may skip NaN on a GPU: a NaN key must reach its scale (and the bound)
        nans = tl.sum((x != x).to(tl.int32), axis=1)
        absmax = tl.where(nans > 0, float("nan"), tl.max(tl.abs(x), axis=1))
        s = _round_scale_up(tl.div_rn(absmax, tl.full([BLOCK_T], 127.0, tl.float32)))
        usable = (s > 0) & (s == s) & (s != float("inf"))
        div = tl.where(usable, s, 1.0)
        c = tl.floor(tl.div_rn(x, tl.broadcast_to(div[:, None], [BLOCK_T, 32])) + 0.5)
        c = tl.minimum(tl.maximum(c, -127.0), 127.0)
        c = tl.where(usable[:, None] & load_mask[:, None], c, 0.0)
        s = tl.where(load_mask, s, 0.0)
        tl.store(codes_base + rows.to(tl.int64)[:, None] * scn + ch[None, :] * scd,
                 c.to(tl.int8), mask=store_mask[:, None] & cmask[None, :])
        tl.store(scales_base + rows.to(tl.int64) * ssn + g * ssg, s.to(tl.bfloat16),
                 mask=store_mask)


@triton.jit
def prefill_kernel(
    k_ptr, seqlens_ptr, codes_ptr, scales_ptr,
    skb, skh, skn, skd, scb, sch, scn, scd, ssb, ssh, ssn, ssg,
    Hkv, D, nmax,
    GROUPS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    length = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b).to(tl.int32), 0), nmax)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _quantize_rows(
        k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh,
        codes_ptr + b.to(tl.int64) * scb + hk.to(tl.int64) * sch,
        scales_ptr + b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh,
        rows, rows < length, rows < nmax, skn, skd, scn, scd, ssn, ssg, D,
        GROUPS=GROUPS, BLOCK_T=BLOCK_T,
    )


@triton.jit
def append_kernel(
    k_ptr, pos_ptr, codes_ptr, scales_ptr,
    skb, skh, skn, skd, scb, sch, scn, scd, ssb, ssh, ssn, ssg,
    Hkv, D, nmax,
    GROUPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // Hkv
    hk = pid % Hkv
    raw = tl.load(pos_ptr + b).to(tl.int64)
    # a position outside [0, Nmax) (no value checks) reads and writes nothing
    rows = tl.minimum(tl.maximum(raw, 0), nmax - 1) + tl.arange(0, 1)
    inside = (rows * 0 + raw >= 0) & (rows * 0 + raw < nmax)
    _quantize_rows(
        k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh,
        codes_ptr + b.to(tl.int64) * scb + hk.to(tl.int64) * sch,
        scales_ptr + b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh,
        rows, inside, inside, skn, skd, scn, scd, ssn, ssg, D,
        GROUPS=GROUPS, BLOCK_T=1,
    )


@triton.jit
def _scaled_dots(q_base, c_base, s_base, rows, tmask, gmask, sqd, scn, scd, ssn, ssg, D,
                 GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """``(acc, mag)`` ``[BLOCK_G, BLOCK_T]``: per head and token, ``sum_g s_g (q_g . c_g)`` and
    ``sum_g s_g |q_g|_1`` over the 32-channel scale groups, from which both bounds follow
    (``scale (acc +- half mag)`` plus the slack), in float32 FMA reductions."""
    offs_c = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_G, BLOCK_T], tl.float32)
    mag = tl.zeros([BLOCK_G, BLOCK_T], tl.float32)
    for g in tl.static_range(GROUPS):
        ch = g * 32 + offs_c
        cmask = ch < D
        qg = tl.load(q_base + ch[None, :] * sqd, mask=gmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        c = tl.load(c_base + rows.to(tl.int64)[:, None] * scn + ch[None, :] * scd,
                    mask=tmask[:, None] & cmask[None, :], other=0)
        s = tl.load(s_base + rows.to(tl.int64) * ssn + g * ssg, mask=tmask, other=0.0).to(tl.float32)
        dot = tl.sum(qg[:, None, :] * c.to(tl.float32)[None, :, :], axis=2)
        qabs = tl.sum(tl.abs(qg), axis=1)
        acc += s[None, :] * dot
        mag += s[None, :] * qabs[:, None]
    return acc, mag


@triton.jit
def _group_rows_q(q_ptr, b, hk, G, D, sqb, sqh, sqd, GROUP_ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """q spread over ``BLOCK_G x GROUP_ROWS`` rows, row ``(h, g)`` holding head h's channels of
    scale group g and zeros elsewhere, so that one dot with a tile of codes gives every group's
    partial dot product at once; and ``|q_g|_1`` per head and group ``[BLOCK_G, GROUP_ROWS]``."""
    offs_m = tl.arange(0, BLOCK_G * GROUP_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    head = offs_m // GROUP_ROWS
    group = offs_m % GROUP_ROWS
    mask = (head < G)[:, None] & (offs_d < D)[None, :] & ((offs_d // 32)[None, :] == group[:, None])
    q_rows = tl.load(q_ptr + b.to(tl.int64) * sqb + (hk * G + head)[:, None] * sqh + offs_d[None, :] * sqd,
                     mask=mask, other=0.0)
    qabs = tl.reshape(tl.sum(tl.abs(q_rows.to(tl.float32)), axis=1), (BLOCK_G, GROUP_ROWS))
    return q_rows, qabs


@triton.jit
def _codes_as_fp16(c):
    """int8 codes as fp16, four per 32-bit word with full-rate bit operations: each byte, offset
    by 128 (``xor 0x80``), becomes the low byte of the fp16 0x64XX = 1024 + XX, and one packed
    subtraction of 1152 leaves the code, exactly. The plain conversion is one I2F per code, a
    quarter-rate instruction on Hopper: ~260 us of the 1M-token scan on the H200 (ncu)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, k;
        xor.b32 t, $2, 0x80808080;
        prmt.b32 $0, t, 0x64646464, 0x4140;
        prmt.b32 $1, t, 0x64646464, 0x4342;
        mov.b32 k, 0x64806480;
        sub.f16x2 $0, $0, k;
        sub.f16x2 $1, $1, k;
        }""",
        constraints="=r,=r,r", args=[c], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _grouped_scaled_dots(q_rows, qabs, c_base, s_base, rows, tmask, scn, scd, ssn, ssg, D,
                         GROUPS: tl.constexpr, GROUP_ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                         UPCAST: tl.constexpr, CODES_FP16: tl.constexpr):
    """``(acc, mag)`` as :func:`_scaled_dots` from one read of a tile's codes ``[BLOCK_T, D]``
    and scales and one tensor-core dot with the group-spread q (:func:`_group_rows_q`). The
    products of 16-bit q and integer codes ``|c| <= 127`` are exact and the other groups'
    channels add exact zeros, so each group's partial is the K = 32 dot's; the float32
    accumulation is covered by the bound's slack as before. ``CODES_FP16`` (fp16 q on a GPU):
    the codes are converted by :func:`_codes_as_fp16` (inline PTX; the interpreter has none)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, GROUP_ROWS)
    c = tl.load(c_base + rows.to(tl.int64)[:, None] * scn + offs_d[None, :] * scd,
                mask=tmask[:, None] & (offs_d < D)[None, :], other=0)
    s = tl.load(s_base + rows.to(tl.int64)[:, None] * ssn + offs_r[None, :] * ssg,
                mask=tmask[:, None] & (offs_r < GROUPS)[None, :], other=0.0).to(tl.float32)
    if UPCAST:
        dots = tl.dot(q_rows.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision=DOT_PREC)
    elif CODES_FP16:
        dots = tl.dot(q_rows, tl.trans(_codes_as_fp16(c)), input_precision=DOT_PREC)
    else:
        dots = tl.dot(q_rows, tl.trans(c.to(q_rows.dtype)), input_precision=DOT_PREC)
    st = tl.trans(s)[None, :, :]  # [1, GROUP_ROWS, BLOCK_T]
    acc = tl.sum(tl.reshape(dots, (BLOCK_G, GROUP_ROWS, BLOCK_T)) * st, axis=1)
    mag = tl.sum(qabs[:, :, None] * st, axis=1)
    return acc, mag


@triton.jit
def bounds_kernel(
    q_ptr, codes_ptr, scales_ptr, seqlens_ptr, cand_ptr, slopes_ptr, out_ptr,
    sqb, sqh, sqd, scb, sch, scn, scd, ssb, ssh, ssn, ssg, sab, sah, sap,
    Hq, Hkv, G, D, nmax, num_pages, page_size, scale, rel, abs_slack, half,
    HAS_ALIBI: tl.constexpr, GROUPS: tl.constexpr, PAGES: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    length = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b).to(tl.int32), 0), nmax)
    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, BLOCK_T)
    gmask = offs_g < G
    heads = hk * G + offs_g
    q_base = q_ptr + b.to(tl.int64) * sqb + heads[:, None] * sqh
    c_base = codes_ptr + b.to(tl.int64) * scb + hk.to(tl.int64) * sch
    s_base = scales_ptr + b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh
    out_rows = (b * Hq + heads).to(tl.int64) * num_pages
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=gmask, other=0.0).to(tl.float32)
    for i in range(PAGES):
        page = tl.program_id(1) * PAGES + i
        if page < num_pages:
            first = page * page_size
            n = tl.minimum(tl.maximum(length - first, 0), page_size)
            cand = tl.load(cand_ptr + b.to(tl.int64) * sab + hk * sah + page * sap)
            res = tl.full([BLOCK_G], float("-inf"), tl.float32)
            if (cand != 0) & (n > 0):
                rows = first + offs_t
                tmask = offs_t < n
                acc, mag = _scaled_dots(q_base, c_base, s_base, rows, tmask, gmask, sqd, scn, scd,
                                        ssn, ssg, D, GROUPS, BLOCK_G, BLOCK_T)
                ub = scale * (acc + half * mag)
                slack = (128.0 * scale) * mag
                if HAS_ALIBI:
                    bias = slope[:, None] * (rows - (length - 1)).to(tl.float32)[None, :]
                    ub += bias
                    slack += tl.abs(bias)
                ub = ub + (rel * slack + abs_slack)
                ub = tl.where(tmask[None, :], ub, float("-inf"))
                # max reductions may skip NaN on a GPU: a NaN token bound must reach the page
                nans = tl.sum((ub != ub).to(tl.int32), axis=1)
                res = tl.where(nans > 0, float("nan"), tl.max(ub, axis=1))
            tl.store(out_ptr + out_rows + page, res, mask=gmask)


@triton.jit
def scan_kernel(
    q_ptr, codes_ptr, scales_ptr, seqlens_ptr, read_all_ptr, slopes_ptr,
    cand_z_ptr, cand_cnt_ptr, split_max_ptr, page_ub_ptr,
    sqb, sqh, sqd, scb, sch, scn, scd, ssb, ssh, ssn, ssg,
    Hq, Hkv, G, D, num_splits, seg, num_pages, nmax, scale, am1, rel, abs_slack, half,
    HAS_ALIBI: tl.constexpr, GROUPS: tl.constexpr, GROUP_ROWS: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, CODES_FP16: tl.constexpr,
):
    """One read of a split's sketch rows for the G query heads of a KV head: each token's lower
    and upper score bounds (``reference._token_bounds``, the same float32 form and slack), the
    page maxima of the upper bounds (``page_ub``, x units, NaN if a token's bound is NaN), and
    the lower bounds in z units that can lie above their threshold (above the split's running
    max - 1), compacted per split with the split's max, in the K pass's layout, so the exact
    threshold solve of the decode (``attend/tau_kernels.py``) gives the floor.

    One tensor-core dot per tile gives every scale group's partial (:func:`_grouped_scaled_dots`):
    16-bit q times integer codes |c| <= 127 are exact products, accumulated in float32 (the
    slack's factor two covers the accumulator's rounding); fp32 q uses float32 dots
    (``DOT_PREC`` "ieee"). ``GROUP_ROWS``: the scale groups padded to a power of two, and
    ``BLOCK_G x GROUP_ROWS >= 16`` rows for the dot."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    length = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b).to(tl.int32), 0), nmax)
    length = tl.where(tl.load(read_all_ptr + b).to(tl.int32) != 0, 0, length)  # read densely: scan nothing
    j0 = split * seg
    j1 = tl.minimum(j0 + seg, length)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_pg = tl.arange(0, BLOCK_N // PAGE)
    gmask = offs_g < G
    heads = hk * G + offs_g
    q_rows, qabs = _group_rows_q(q_ptr, b, hk, G, D, sqb, sqh, sqd, GROUP_ROWS, BLOCK_G, BLOCK_D)
    c_base = codes_ptr + b.to(tl.int64) * scb + hk.to(tl.int64) * sch
    s_base = scales_ptr + b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh
    cap = num_splits * seg
    z_base = cand_z_ptr + (b * Hq + heads[:, None]).to(tl.int64) * cap + split * seg
    ub_rows = (b * Hq + heads[:, None]).to(tl.int64) * num_pages
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=gmask, other=0.0).to(tl.float32)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    nonfinite = tl.zeros([BLOCK_G], tl.int32)
    count = tl.zeros([], tl.int32)
    for j in range(j0, j1, BLOCK_N):
        rows = j + offs_n
        tmask = rows < j1
        acc, mag = _grouped_scaled_dots(q_rows, qabs, c_base, s_base, rows, tmask, scn, scd, ssn, ssg, D,
                                        GROUPS, GROUP_ROWS, BLOCK_G, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST,
                                        CODES_FP16)
        slack = (128.0 * scale) * mag
        bias = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        if HAS_ALIBI:
            bias = slope[:, None] * (rows - (length - 1)).to(tl.float32)[None, :]
            slack += tl.abs(bias)
        margin = rel * slack + abs_slack
        ub = scale * (acc + half * mag) + bias + margin
        z = am1 * (scale * (acc - half * mag) + bias - margin)
        live = tmask[None, :] & gmask[:, None]
        ub = tl.where(live, ub, float("-inf"))
        # max reductions may skip NaN on a GPU: a NaN token bound must reach its page
        ub3 = tl.reshape(ub, (BLOCK_G, BLOCK_N // PAGE, PAGE))
        nans = tl.sum((ub3 != ub3).to(tl.int32), axis=2)
        page_ub = tl.where(nans > 0, float("nan"), tl.max(ub3, axis=2))
        pages = j // PAGE + offs_pg
        tl.store(page_ub_ptr + ub_rows + pages[None, :], page_ub,
                 mask=gmask[:, None] & (pages * PAGE < j1)[None, :])
        # A non-finite lower bound (a non-finite key) says nothing: the head's floor is -inf.
        bad = live & ((z != z) | (tl.abs(z) == float("inf")))
        nonfinite = tl.maximum(nonfinite, tl.max(bad.to(tl.int32), axis=1))
        z = tl.where(live & (bad == 0), z, float("-inf"))
        z_top = tl.max(z, axis=1)
        m = tl.maximum(m, z_top)
        thr = tl.where(m > float("-inf"), m - 1.0, float("inf"))
        # Most tiles hold no candidate (every head's best bound is under its threshold): the
        # per-token test, its reductions and the compaction run only for the others.
        if tl.max((z_top > thr).to(tl.int32), axis=0) > 0:
            keep = tl.max((z > thr[:, None]).to(tl.int32), axis=0)
            pos = count + tl.cumsum(keep, axis=0) - keep
            tl.store(z_base + pos[None, :], z, mask=(keep > 0)[None, :] & gmask[:, None])
            count += tl.sum(keep, axis=0)
    close_split(cand_cnt_ptr, split_max_ptr, pid_bh, split, num_splits, count, m, nonfinite,
                b, Hq, heads, gmask)


@triton.jit
def keep_kernel(
    page_ub_ptr, tau_ptr, seqlens_ptr, read_all_ptr, flag_ptr, count_ptr, floor_ptr,
    Hq, Hkv, G, num_pages, page_size, am1,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The certified selection of one page block from the floor: a valid page is kept when its
    upper bound is not at or below the floor for some head of the group (NaN keeps it), or when
    its row reads every page; flags and the block's count in ``select_kernels.compact_kernel``'s
    layout. The floor is the lower bounds' threshold rounded down by ``2^-12 (1 + |tau|)`` for
    the solve's own rounding (``reference.sketch_tau_floor``), ``-inf`` where it is not finite
    or the row reads every page; block 0 stores it."""
    blk = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    heads = hk * G + offs_g
    dense = tl.load(read_all_ptr + b).to(tl.int32)
    tau = tl.load(tau_ptr + b * Hq + heads, mask=gmask, other=float("-inf"))
    finite = (tau == tau) & (tl.abs(tau) != float("inf")) & ((offs_g * 0 + dense) == 0)
    floor = tl.where(finite, tau - 2.0 ** -12 * (1.0 + tl.abs(tau)), float("-inf"))
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    pages = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = (pages < num_pages) & (pages * page_size < length)
    read_all = (pages * 0 + dense) != 0  # a vector: the interpreter rejects scalar & vector masks
    bounded = valid & (read_all == 0)
    ub = tl.load(page_ub_ptr + (b * Hq + heads[:, None]).to(tl.int64) * num_pages + pages[None, :],
                 mask=gmask[:, None] & bounded[None, :], other=float("-inf"))
    above = ((am1 * ub <= floor[:, None]) == 0) & gmask[:, None]
    keep = valid & ((tl.max(above.to(tl.int32), axis=0) > 0) | read_all)
    flags = keep.to(tl.int8)
    tl.store(flag_ptr + pid.to(tl.int64) * num_pages + pages, flags, mask=pages < num_pages)
    tl.store(count_ptr + pid * tl.num_programs(0) + blk, tl.sum(flags.to(tl.int32), axis=0))
    if blk == 0:
        tl.store(floor_ptr + b * Hq + heads, floor, mask=gmask)
