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
"""

from __future__ import annotations

import triton
import triton.language as tl

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
    offs_c = tl.arange(0, 32)
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
                acc = tl.zeros([BLOCK_G, BLOCK_T], tl.float32)
                mag = tl.zeros([BLOCK_G, BLOCK_T], tl.float32)
                for g in tl.static_range(GROUPS):
                    ch = g * 32 + offs_c
                    cmask = ch < D
                    qg = tl.load(q_base + ch[None, :] * sqd, mask=gmask[:, None] & cmask[None, :],
                                 other=0.0).to(tl.float32)
                    c = tl.load(c_base + rows.to(tl.int64)[:, None] * scn + ch[None, :] * scd,
                                mask=tmask[:, None] & cmask[None, :], other=0).to(tl.float32)
                    s = tl.load(s_base + rows.to(tl.int64) * ssn + g * ssg, mask=tmask,
                                other=0.0).to(tl.float32)
                    dot = tl.sum(qg[:, None, :] * c[None, :, :], axis=2)  # [BLOCK_G, BLOCK_T]
                    qabs = tl.sum(tl.abs(qg), axis=1)
                    acc += s[None, :] * (dot + half * qabs[:, None])
                    mag += s[None, :] * qabs[:, None]
                ub = scale * acc
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
