"""The decode kernels in parts, for a threshold that is solved elsewhere (context parallel decode).

One rank of a sharded cache holds some of every query head's scores. Full entmax needs the one
threshold of all of them; these functions give a rank what it needs to take part, without moving
scores it does not have to, in few launches (a CUDA-graph replay pays a few microseconds for each):

1. :func:`local_candidates`: the K pass over the rank's selected pages and its *local* exact
   threshold ``tau_r`` (the decode kernels' split-parallel solve, ``kernel.py``). Because
   ``f(t) = sum_i [z_i - t]_+^beta`` only grows when scores are added, the global threshold is at
   least every ``tau_r``, so at least ``tau_lo = max_r tau_r``.
2. :func:`gather_above`: this rank's scores above a floor just under ``tau_lo``, compacted into a
   small fixed buffer per head with their count in its last slot (one buffer, ready for one
   all_gather): the global support lies among them. Splits whose maximum is not above the floor
   are skipped without reading their candidates (on sparse heads, most of them).
3. :func:`solve_gathered`: the exact threshold of every rank's gathered scores together, which is
   the global threshold (one program per head, float64 sums; see ``gathered_tau_kernel``).
4. :func:`partial_sums`: the V pass at the global threshold, ``sum p v`` and ``sum p`` over the
   rank's tokens, unnormalised, packed in one buffer to be summed over the ranks.

Bytes per step: the selected K rows once, the candidates' scores (4 bytes per head) of the splits
that can hold the support, V only for the rows in the support; the buffers for the collectives are
``[B, Hq, cap + 1]`` and ``[B, Hq, D + 1 + extra]`` floats.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .. import _common as cm
from .decode_kernels import split_sums
from .kernel import output_partials, plan_splits, score_candidates, solve_tau

__all__ = ["LocalCandidates", "FLOOR_MARGIN", "gather_above", "local_candidates", "partial_sums", "solve_gathered"]

# How far under tau_lo the gather reaches: the local solve is exact up to float32 rounding, and
# scores gathered below the global threshold never change it (they add nothing there).
FLOOR_MARGIN = 1e-4
# Iterations of the gathered solve: support-fixing closed forms (integer beta) or Newton steps
# from below (other beta); typically under 10, this bounds a pathological head.
GATHERED_ITERS = 64


class LocalCandidates(NamedTuple):
    """One rank's K pass: the candidate buffers of ``score_candidates`` (with each split's maximum
    ``split_max [B, Hq, splits]``), the local exact threshold ``tau`` ``[B, Hq]`` (``+inf`` where
    the rank attends nothing, NaN for a poisoned head), the V pass's scratch and the tuned config."""

    cand_z: Tensor
    cand_tok: Tensor
    cand_cnt: Tensor
    split_max: Tensor
    tau: Tensor
    scratch: Tensor
    cfg: dict


def local_candidates(q: Tensor, k_cache: Tensor, seqlens: Tensor, page_indices: Tensor, num_selected: Tensor, *,
                     page_size: int, alpha: float, scale: float,
                     alibi_slopes: Optional[Tensor] = None) -> LocalCandidates:
    """The K pass and the local threshold over the selected pages (arguments as ``paged_decode``)."""
    batch, hq = q.shape[:2]
    hkv = k_cache.shape[1]
    cfg, splits, seg = plan_splits(q, page_indices, page_size)
    cand_z, cand_tok, cand_cnt, split_max = score_candidates(
        q, k_cache, seqlens, page_indices, num_selected, alibi_slopes, page_size, alpha, scale, cfg, splits, seg)
    tau = torch.empty((batch, hq), device=q.device, dtype=torch.float32)
    scratch = solve_tau(cand_z, cand_cnt, split_max, tau, batch, hq, hkv, hq // hkv, splits, seg, alpha, cfg)[0]
    return LocalCandidates(cand_z, cand_tok, cand_cnt, split_max, tau, scratch, cfg)


@triton.jit
def _floor_under(tau_lo, margin):
    """The gather's floor under ``tau_lo`` (float32): ``+inf`` for a poisoned head (``tau_lo`` is
    ``+inf``), ``-inf`` where no rank attends anything."""
    floor = tau_lo - margin * (1.0 + tl.abs(tau_lo))
    return tl.where(tau_lo == float("inf"), float("inf"), floor)


@triton.jit
def above_kernel(cand_z_ptr, cand_cnt_ptr, split_max_ptr, tau_lo_ptr, out_ptr, Hq, Hkv, G, num_splits, seg, CAP,
                 margin, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """One (sequence x KV head, split): append the split's candidates above each head's floor to
    the head's row of ``out`` (``CAP`` slots, then the count as a float, which keeps counting past
    ``CAP``). A split whose maximum is not above any of its heads' floors reads nothing more."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, BLOCK_T)
    gmask = offs_g < G
    rows = b * Hq + hk * G + offs_g
    floor = _floor_under(tl.load(tau_lo_ptr + rows, mask=gmask, other=float("inf")), margin)
    top = tl.load(split_max_ptr + rows * num_splits + split, mask=gmask, other=float("-inf"))
    if tl.max((top > floor).to(tl.int32), axis=0) > 0:
        count = tl.load(cand_cnt_ptr + pid_bh * num_splits + split)
        z_base = cand_z_ptr + rows[:, None].to(tl.int64) * (num_splits * seg) + split * seg
        out_rows = out_ptr + rows.to(tl.int64) * (CAP + 1)
        for t in range(0, count, BLOCK_T):
            tt = t + offs_t
            z = tl.load(z_base + tt[None, :], mask=gmask[:, None] & (tt < count)[None, :], other=float("-inf"))
            keep = (z > floor[:, None]).to(tl.int32)
            kept = tl.sum(keep, axis=1)
            base = tl.atomic_add(out_rows + CAP, kept.to(tl.float32), mask=gmask & (kept > 0)).to(tl.int32)
            slot = base[:, None] + tl.cumsum(keep, axis=1) - keep
            tl.store(out_rows[:, None] + slot, z, mask=(keep > 0) & (slot < CAP))


def gather_above(local: LocalCandidates, tau_lo: Tensor, cap: int) -> Tensor:
    """``[B, Hq, cap + 1]`` float32: the rank's candidate scores above a floor just under ``tau_lo``
    ``[B, Hq]`` (float32, z units: the max of the ranks' local thresholds, ``+inf`` for a poisoned
    head, ``-inf`` where none attends anything), in no particular order, then in the last slot how
    many there were (more than ``cap`` means some were left out)."""
    batch, hq, width = local.cand_z.shape
    hkv, splits = local.cand_cnt.shape[1], local.cand_cnt.shape[2]
    out = torch.zeros((batch, hq, cap + 1), device=tau_lo.device, dtype=torch.float32)
    wrap_triton(above_kernel)[(batch * hkv, splits)](
        local.cand_z, local.cand_cnt, local.split_max, tau_lo.contiguous(), out, hq, hkv, hq // hkv, splits,
        width // splits, cap, FLOOR_MARGIN, BLOCK_G=max(16, cm.next_pow2(hq // hkv)), BLOCK_T=local.cfg["BLOCK_T"],
    )
    return out


@triton.jit
def _sums_above(gath_ptr, row, rows, W, CAP, t, beta, RMAX: tl.constexpr, BLOCK: tl.constexpr):
    """Over every rank's gathered scores ``z > t`` (float64 ``w = z - t``): ``(count, sum w^beta
    (RMAX 0) or sum w (RMAX 1, 2), sum w^(beta-1) (RMAX 0) or sum w^2 (RMAX 2), min w)``."""
    offs = tl.arange(0, BLOCK)
    c = tl.zeros([BLOCK], tl.float64)
    a = tl.zeros([BLOCK], tl.float64)
    s = tl.zeros([BLOCK], tl.float64)
    lo = tl.full([BLOCK], float("inf"), tl.float64)
    for w in range(W):
        base = gath_ptr + (w * rows + row).to(tl.int64) * (CAP + 1)
        n = tl.minimum(tl.load(base + CAP).to(tl.int32), CAP)
        for start in range(0, n, BLOCK):
            z = tl.load(base + start + offs, mask=start + offs < n, other=float("-inf")).to(tl.float64)
            live = z > t
            u = tl.where(live, z - t, 0.0)
            c += live.to(tl.float64)
            lo = tl.minimum(lo, tl.where(live, u, float("inf")))
            if RMAX == 0:
                u32 = tl.where(live, u, 1.0).to(tl.float32)
                lg = tl.log2(u32)
                a += tl.where(live, tl.exp2(beta * lg).to(tl.float64), 0.0)
                s += tl.where(live, tl.exp2((beta - 1.0) * lg).to(tl.float64), 0.0)
            else:
                a += u
                if RMAX == 2:
                    s += u * u
    return tl.sum(c, axis=0), tl.sum(a, axis=0), tl.sum(s, axis=0), tl.min(lo, axis=0)


@triton.jit
def gathered_tau_kernel(gath_ptr, tau_lo_ptr, tau_ptr, exact_ptr, rows, W, CAP, beta, margin,
                        RMAX: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """One query head: the exact threshold ``tau`` of every rank's gathered scores (``f(tau) = 1``
    with ``f(t) = sum [z - t]_+^beta``), i.e. the global threshold.

    ``t`` starts at a proven lower bound (the gather's floor, or the maximum less 1) and climbs:
    for integer beta (RMAX 1, 2) the closed-form root over the support ``{z > t}`` is taken once it
    keeps every score of that support (then the support is the true one and the root is exact in
    float64), else a Newton step (from below on the convex ``f`` it never passes tau); for other
    beta, Newton steps until they stop moving (powers in float32, sums in float64). ``exact`` is 0
    where some rank's gather overflowed or the head is poisoned (tau NaN); ``+inf`` where nothing
    is attended anywhere."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tau_lo = tl.load(tau_lo_ptr + row)
    floor = _floor_under(tau_lo, margin)
    big = tl.full([BLOCK], float("-inf"), tl.float32)
    overflow = 0
    for w in range(W):
        base = gath_ptr + (w * rows + row).to(tl.int64) * (CAP + 1)
        cnt = tl.load(base + CAP).to(tl.int32)
        overflow = tl.maximum(overflow, (cnt > CAP).to(tl.int32))
        n = tl.minimum(cnt, CAP)
        for start in range(0, n, BLOCK):
            big = tl.maximum(big, tl.load(base + start + offs, mask=start + offs < n, other=float("-inf")))
    top = tl.max(big, axis=0).to(tl.float64)
    t = tl.maximum(floor.to(tl.float64), top - 1.0)
    start_t = t
    done = top == float("-inf")
    it = 0
    while (it < ITERS) & (done == 0):
        c, a, s, wmin = _sums_above(gath_ptr, row, rows, W, CAP, t, beta, RMAX, BLOCK)
        if RMAX == 1:
            step = (a - 1.0) / c  # f(t + d) = a - c d - 1 while every score of {z > t} stays in
            done = step <= wmin
        elif RMAX == 2:
            disc = a * a - c * (s - 1.0)
            root = (a - tl.sqrt(tl.maximum(disc, 0.0))) / c
            done = (disc >= 0.0) & (root <= wmin)
            step = tl.where(done, root, (s - 1.0) / (2.0 * a))
        else:
            step = (a - 1.0) / (beta * s)
            # the powers are float32 (~1e-7 relative): a step this small is rounding noise, and the
            # root is nearer than the step (Newton's error after it is of the step's square)
            done = tl.abs(step) <= 2.5e-7 * (1.0 + tl.abs(t))
        t = tl.maximum(t + step, start_t)
        it += 1
    tau = tl.where(top == float("-inf"), float("inf"), t.to(tl.float32))
    poisoned = tau_lo == float("inf")
    tl.store(tau_ptr + row, tl.where(poisoned, float("nan"), tau))
    # 0 or 1 exactly (read as torch.bool): a cast of the comparison may store 0xFF for true
    tl.store(exact_ptr + row, tl.where((overflow == 0) & (poisoned == 0), 1, 0).to(tl.int8))


def solve_gathered(gathered: Tensor, tau_lo: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(tau [B, Hq] float32, exact [B, Hq] bool)``: the exact threshold of every rank's gathered
    scores ``gathered [W, B, Hq, cap + 1]`` (the all_gather of :func:`gather_above`'s buffers)
    above the floor under ``tau_lo`` ``[B, Hq]`` (the same on every rank)."""
    world, batch, hq, width = gathered.shape
    rows = batch * hq
    closed = cm.integer_beta(alpha) in (1, 2)  # closed-form roots; beta = 3, 4 take Newton steps too
    tau = torch.empty((batch, hq), device=gathered.device, dtype=torch.float32)
    exact = torch.empty((batch, hq), device=gathered.device, dtype=torch.int8)
    wrap_triton(gathered_tau_kernel)[(rows,)](
        gathered, tau_lo.contiguous(), tau, exact, rows, world, width - 1, 1.0 / (alpha - 1.0), FLOOR_MARGIN,
        RMAX=cm.integer_beta(alpha) if closed else 0, ITERS=GATHERED_ITERS, BLOCK=min(1024, cm.next_pow2(width - 1)),
        num_warps=4,
    )
    return tau, exact.view(torch.bool)


@triton.jit
def sums_kernel(o_part_ptr, l_part_ptr, tau_ptr, out_ptr, D, num_splits, WIDTH,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query head: ``sum p v`` over the splits into ``out[:D]``, ``sum p`` into ``out[D]``
    (NaN for a poisoned head, so the normalised output is NaN there)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    o_sum, l_sum = split_sums(o_part_ptr, l_part_ptr, pid, D, num_splits, BLOCK_S, BLOCK_D)
    tau = tl.load(tau_ptr + pid)
    tl.store(out_ptr + pid * WIDTH + offs_d, o_sum, mask=offs_d < D)
    tl.store(out_ptr + pid * WIDTH + D, tl.where(tau != tau, float("nan"), l_sum))


def partial_sums(local: LocalCandidates, v_cache: Tensor, tau: Tensor, alpha: float, extra: int = 0) -> Tensor:
    """``[B, Hq, D + 1 + extra]`` float32: ``sum p v`` and ``sum p`` over this rank's candidates
    at the thresholds ``tau`` ``[B, Hq]`` (float32, z units), unnormalised; the last ``extra``
    columns are left for the caller to fill (they ride in the same all_reduce)."""
    o_part, l_part = output_partials(v_cache, local.cand_z, local.cand_tok, local.cand_cnt, tau.contiguous(),
                                     local.scratch, alpha, local.cfg)
    batch, hq, splits, dim = o_part.shape
    out = torch.empty((batch, hq, dim + 1 + extra), device=v_cache.device, dtype=torch.float32)
    wrap_triton(sums_kernel)[(batch * hq,)](
        o_part, l_part, tau.contiguous(), out, dim, splits, dim + 1 + extra,
        BLOCK_S=cm.next_pow2(splits), BLOCK_D=max(16, cm.next_pow2(dim)), num_warps=4,
    )
    return out
