"""Triton kernel of the certified round: which pages must be read for the certificate to hold.

``violation_kernel`` (page block, batch x KV head) reads kmin/kmax once per page, forms the Quest
bound of all G query heads of the group in registers (never written out) and flags a page when it
is valid and either already selected, or read-all for its sequence, or some head of the group has
``(alpha-1) u > tau`` (a NaN bound counts: such a page is read). It also writes the block's flag
count for the parallel compaction (``select_kernels.compact_kernel``) and clears a head's
``bounds_finite`` flag when one of its bounds is not finite. A sequence marked read-all loads
nothing: its flags are its valid pages.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..select.select_kernels import _page_counts, group_page_bounds, stat_pages


@triton.jit
def violation_kernel(
    q_ptr, kmin_ptr, kmax_ptr, seqlens_ptr, slopes_ptr, tau_ptr, sel_ptr, read_all_ptr,
    flag_ptr, count_ptr, finite_ptr,
    sqb, sqh, sqd, ssb, ssh, ssp, ssd,
    Hq, Hkv, G, D, num_pages, page_size, scale, softcap, am1,
    table_ptr, stb, stp, HAS_TABLE: tl.constexpr,
    HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    read_all_flag = tl.load(read_all_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    pages = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    gmask = offs_g < G
    heads = hk * G + offs_g
    inside = pages < num_pages
    valid = _page_counts(pages, length, page_size, num_pages) > 0
    row = pid_bh.to(tl.int64) * num_pages
    if read_all_flag != 0:  # every valid page, no bound read
        flags = valid.to(tl.int8)
        tl.store(flag_ptr + row + pages, flags, mask=inside)
        tl.store(count_ptr + pid_bh * tl.num_programs(0) + blk, tl.sum(flags.to(tl.int32), axis=0))
        return
    selected = tl.load(sel_ptr + row + pages, mask=inside, other=0) != 0
    u = group_page_bounds(q_ptr, kmin_ptr, kmax_ptr, slopes_ptr, b, hk, pages, valid, length,
                          sqb, sqh, sqd, ssb, ssh, ssp, ssd, G, D, page_size, scale, softcap,
                          HAS_ALIBI, SOFTCAP, BLOCK_G, BLOCK_D, DOT_PREC, UPCAST,
                          stat_pages(table_ptr, b, stb, stp, pages, valid, HAS_TABLE))
    tau = tl.load(tau_ptr + b * Hq + heads, mask=gmask, other=float("inf"))
    bounded = gmask[:, None] & valid[None, :]
    violates = bounded & ~(am1 * u <= tau[:, None])
    hit = tl.max(violates.to(tl.int32), axis=0) > 0
    keep = valid & (selected | hit)
    flags = keep.to(tl.int8)
    tl.store(flag_ptr + row + pages, flags, mask=inside)
    tl.store(count_ptr + pid_bh * tl.num_programs(0) + blk, tl.sum(flags.to(tl.int32), axis=0))
    wild = bounded & ~(tl.abs(u) < float("inf"))
    tl.store(finite_ptr + b * Hq + heads, tl.zeros([BLOCK_G], tl.int8),
             mask=gmask & (tl.max(wild.to(tl.int32), axis=1) > 0))


@triton.jit
def mark_pages_kernel(idx_ptr, nsel_ptr, flag_ptr, num_pages, BLOCK: tl.constexpr):
    """``flag[page_indices[s]] = 1`` for the first ``num_selected`` slots of one (batch, KV head)
    row (flags zeroed by the caller): the selected pages as flags, for ``violation_kernel``."""
    blk = tl.program_id(0)
    pid = tl.program_id(1)
    slots = blk * BLOCK + tl.arange(0, BLOCK)
    used = slots < tl.load(nsel_ptr + pid)
    row = pid.to(tl.int64) * num_pages
    pages = tl.load(idx_ptr + row + slots, mask=used & (slots < num_pages), other=-1)
    ok = used & (pages >= 0) & (pages < num_pages)
    tl.store(flag_ptr + row + pages, tl.full([BLOCK], 1, tl.int8), mask=ok)


@triton.jit
def certified_heads_kernel(
    tau_ptr, finite_ptr, seqlens_ptr, ok_ptr, cert_ptr, delta_ptr, Hq, capacity,
    BLOCK_H: tl.constexpr,
):
    """One sequence's certificate after a certified round: a head is certified when its tau and
    bounds are finite, the length lies in ``[1, capacity]`` and the statistics are sound; delta is
    0 where certified, else 1 (one launch for what was ten elementwise passes)."""
    b = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)
    hmask = heads < Hq
    length = tl.load(seqlens_ptr + b).to(tl.int64)
    sound = (length >= 1) & (length <= capacity) & (tl.load(ok_ptr + b) != 0)
    tau = tl.load(tau_ptr + b * Hq + heads, mask=hmask, other=float("nan"))
    finite = tl.load(finite_ptr + b * Hq + heads, mask=hmask, other=0) != 0
    cert = finite & (tl.abs(tau) < float("inf")) & sound
    tl.store(cert_ptr + b * Hq + heads, cert.to(tl.int8), mask=hmask)
    tl.store(delta_ptr + b * Hq + heads, tl.where(cert, 0.0, 1.0), mask=hmask)


@triton.jit
def policy_update_kernel(
    skip_ptr, dense_ptr, nsel_ptr, seqlens_ptr, Hkv, num_pages, page_size, dense_above, probe_every,
    BLOCK_K: tl.constexpr,
):
    """``certify/policy.certify_policy_update_`` for one sequence, in one launch."""
    b = tl.program_id(0)
    heads = tl.arange(0, BLOCK_K)
    read = tl.sum(tl.load(nsel_ptr + b * Hkv + heads, mask=heads < Hkv, other=0).to(tl.int64), axis=0)
    length = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b).to(tl.int64), 0), num_pages * page_size)
    pages = (length + page_size - 1) // page_size * Hkv
    heavy = read.to(tl.float32) > dense_above * pages.to(tl.float32)
    skip = tl.load(skip_ptr + b)
    after = tl.where(tl.load(dense_ptr + b) != 0, skip - 1, tl.where(heavy, probe_every - 1, 0))
    tl.store(skip_ptr + b, tl.maximum(after, 0))
