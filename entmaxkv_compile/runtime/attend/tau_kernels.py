"""The exact entmax threshold of one decode query, split-parallel: pivot levels and their merge.

The candidates of a query head (scores ``z`` kept by the K pass, compacted per split) are searched
for ``tau`` solving ``f(tau) = sum_i [z_i - tau]_+^beta = 1`` in a fixed number of *levels*. One
level is two launches:

* ``tau_level_kernel`` (batch x query head, run of splits): every program evaluates, on the
  candidates of its splits, NP pivots ``t_k`` spread over the head's current bracket ``[lo, hi]``: the power
  sums ``M_r(t_k) = sum_{z > t_k} (z - t_k)^r`` (``r <= beta`` for integer beta, else ``f(t_k)``
  directly), and the nearest scores on each side of every pivot. It also copies the candidates
  above the bracket's lower end ``lo`` (the others can never be in the support; at level 1
  ``lo = M - 1`` with the global max) into a compacted buffer, so later levels read only them.
* ``tau_merge_kernel`` (batch x query head): adds the programs' partials in a fixed order
  (deterministic), narrows the bracket to the pivot interval ``[t_k, t_k+1]`` holding tau, and
  **certifies**: with the support taken as ``A = {z > t_k+1}`` (or ``A' = {z > t_k}``), the root
  of ``sum_A (z - t)^beta = 1`` is solved from the power sums by a monotone Newton iteration on a
  scalar; if it lies on the right side of the nearest excluded (included) score, that support is
  the support of full entmax and the root *is* tau (up to float32 rounding of the sums). The
  head is then done and later levels skip it.

The first level needs no state: its pivots are log-spaced in ``M - t`` over the proven bracket
``M - 1 <= tau <= M - C^(1-alpha)`` (``M`` the head's max, ``C`` its candidate count). Later
levels space their pivots evenly over the narrowed bracket, which shrinks at least (NP - 1)-fold
per level. The cost of a level is one read of its candidates plus NP multiply-adds each,
spread over the whole grid (the serial solve it replaces ran one program per head); it grows with
the number of candidates the K pass keeps, which is what remains to be cut on flat heads. For
non-integer beta there is no closed certificate; eight levels bring the bracket near float32
resolution and tau is its midpoint. A head still uncertified after the last level (integer beta,
more than ~10^4 distinct scores packed within ~1e-5 of tau) also gets the bracket's midpoint.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Pivots per level; the slots of a partial (count, M_1..M_4, f for general beta, nearest score
# below, above); Newton steps of the scalar root solve in the merge.
NUM_PIVOTS = 16
NUM_SLOTS = 8
NEWTON_STEPS = 30


@triton.jit
def _empty_sums(NP: tl.constexpr):
    """Per-pivot accumulators of a level: count, M_1..M_4, f, nearest score below, above."""
    zero = tl.zeros([NP], tl.float32)
    return (zero, zero, zero, zero, zero, zero, tl.full([NP], float("-inf"), tl.float32),
            tl.full([NP], float("inf"), tl.float32))


@triton.jit
def tau_level_kernel(
    src_z_ptr, src_cnt_ptr, dst_z_ptr, dst_cnt_ptr, split_max_ptr, state_ptr, part_ptr, piv_ptr,
    Hq, Hkv, G, num_splits, seg, alpha_m1, beta, splits_per_prog, num_chunks,
    FIRST: tl.constexpr, FROM_CAND: tl.constexpr,
    RMAX: tl.constexpr, NP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One pivot level over a run of splits' candidates of one query head (see the module doc).

    ``src_cnt`` is indexed by (batch, KV head, split) when ``FROM_CAND`` (the K pass's counts,
    shared by the group) and by (batch, query head, split) otherwise. ``state`` holds per head
    ``lo, hi, done, tau``; the first program writes the level's pivots to ``piv`` for the merge (and, at
    level 1, the initial state). ``RMAX`` is beta for integer beta <= 4 and 0 for general beta.
    """
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // Hq
    h = pid % Hq
    hk = h // G
    cap = num_splits * seg
    offs_k = tl.arange(0, NP)
    kf = offs_k.to(tl.float32)

    if FIRST:
        offs_s = tl.arange(0, BLOCK_S)
        smask = offs_s < num_splits
        smax = tl.load(split_max_ptr + pid * num_splits + offs_s, mask=smask, other=float("-inf"))
        poisoned = tl.max((smax != smax).to(tl.int32), axis=0) > 0  # an attended NaN/+inf score
        big_m = tl.max(tl.where(smax != smax, float("-inf"), smax), axis=0)
        n_cand = tl.sum(tl.load(src_cnt_ptr + (b * Hkv + hk) * num_splits + offs_s, mask=smask,
                                other=0), axis=0)
        # d_k = M - t_k, log-spaced from 1 down to C^(1-alpha) (tau's proven range).
        log_dmin = -alpha_m1 * tl.log2(tl.maximum(n_cand, 1).to(tl.float32))
        t = big_m - tl.exp2(log_dmin * kf / (NP - 1))
        live = (big_m > float("-inf")) & (poisoned == 0)
        lo = big_m - 1.0
    else:
        lo = tl.load(state_ptr + pid * 4)
        hi = tl.load(state_ptr + pid * 4 + 1)
        live = tl.load(state_ptr + pid * 4 + 2) == 0
        t = lo + (hi - lo) * kf / (NP - 1)

    c0, c1, c2, c3, c4, cf, below, above = _empty_sums(NP)
    offs_t = tl.arange(0, BLOCK_T)
    split_end = tl.minimum((chunk + 1) * splits_per_prog, num_splits)
    for split in range(chunk * splits_per_prog, split_end):
        if FROM_CAND:
            count = tl.load(src_cnt_ptr + (b * Hkv + hk) * num_splits + split)
        else:
            count = tl.load(src_cnt_ptr + pid * num_splits + split)
        count = tl.where(live, count, 0)
        src = src_z_ptr + pid.to(tl.int64) * cap + split * seg
        dst = dst_z_ptr + pid.to(tl.int64) * cap + split * seg
        kept = tl.zeros([], tl.int32)
        for i in range(0, count, BLOCK_T):
            ii = i + offs_t
            z = tl.load(src + ii, mask=ii < count, other=float("-inf"))
            if tl.max(z, axis=0) > lo:  # a tile at or below lo adds nothing and keeps nothing
                keep = (z > lo).to(tl.int32)
                pos = kept + tl.cumsum(keep, axis=0) - keep
                tl.store(dst + pos, z, mask=keep > 0)
                kept += tl.sum(keep, axis=0)
                u = z[:, None] - t[None, :]
                pos_u = u > 0
                up = tl.where(pos_u, u, 0.0)
                c0 += tl.sum(pos_u.to(tl.float32), axis=0)
                if RMAX >= 1:
                    c1 += tl.sum(up, axis=0)
                if RMAX >= 2:
                    u2 = up * up
                    c2 += tl.sum(u2, axis=0)
                    if RMAX >= 3:
                        c3 += tl.sum(u2 * up, axis=0)
                    if RMAX >= 4:
                        c4 += tl.sum(u2 * u2, axis=0)
                if RMAX == 0:
                    pw = tl.exp2(beta * tl.log2(tl.where(pos_u, u, 1.0)))
                    cf += tl.sum(tl.where(pos_u, pw, 0.0), axis=0)
                zz = z[:, None] + tl.zeros([BLOCK_T, NP], tl.float32)
                below = tl.maximum(below, tl.max(tl.where(pos_u, float("-inf"), zz), axis=0))
                above = tl.minimum(above, tl.min(tl.where(pos_u, zz, float("inf")), axis=0))
        tl.store(dst_cnt_ptr + pid * num_splits + split, kept)

    base = part_ptr + (pid.to(tl.int64) * num_chunks + chunk) * (8 * NP) + offs_k
    tl.store(base + 0 * NP, c0)
    tl.store(base + 1 * NP, c1)
    tl.store(base + 2 * NP, c2)
    tl.store(base + 3 * NP, c3)
    tl.store(base + 4 * NP, c4)
    tl.store(base + 5 * NP, cf)
    tl.store(base + 6 * NP, below)
    tl.store(base + 7 * NP, above)
    if chunk == 0:
        tl.store(piv_ptr + pid * NP + offs_k, t)
        if FIRST:
            tl.store(state_ptr + pid * 4, lo)
            tl.store(state_ptr + pid * 4 + 1, tl.max(t, axis=0))
            tl.store(state_ptr + pid * 4 + 2, tl.where(live, 0.0, 1.0))
            # A head that never runs keeps this tau: NaN if poisoned, +inf if it has nothing to
            # attend (its output is then 0).
            tl.store(state_ptr + pid * 4 + 3, tl.where(poisoned, float("nan"), float("inf")))


@triton.jit
def _pick(vec, offs, k):
    """vec[k] of a small register vector (k a scalar)."""
    return tl.sum(tl.where(offs == k, vec, 0.0), axis=0)


@triton.jit
def _power_poly(s, c0, c1, c2, c3, c4, RMAX: tl.constexpr):
    """h(s) = sum_i (u_i + s)^beta from the power sums c_r = sum_i u_i^r, and h'(s), beta = RMAX."""
    if RMAX == 1:
        h = c1 + c0 * s
        dh = c0
    elif RMAX == 2:
        h = c2 + 2.0 * c1 * s + c0 * s * s
        dh = 2.0 * c1 + 2.0 * c0 * s
    elif RMAX == 3:
        h = c3 + s * (3.0 * c2 + s * (3.0 * c1 + s * c0))
        dh = 3.0 * c2 + s * (6.0 * c1 + s * 3.0 * c0)
    else:
        h = c4 + s * (4.0 * c3 + s * (6.0 * c2 + s * (4.0 * c1 + s * c0)))
        dh = 4.0 * c3 + s * (12.0 * c2 + s * (12.0 * c1 + s * 4.0 * c0))
    return h, dh


@triton.jit
def _root_from_right(s0, c0, c1, c2, c3, c4, RMAX: tl.constexpr, STEPS: tl.constexpr):
    """The root of h(s) = 1 below s0, where h(s0) >= 1 and h is increasing and convex on the
    support's range: Newton from the right decreases monotonically onto the root."""
    s = s0
    for _ in tl.static_range(STEPS):
        h, dh = _power_poly(s, c0, c1, c2, c3, c4, RMAX)
        step = (h - 1.0) / tl.maximum(dh, 1e-30)
        s = tl.where(h > 1.0, s - step, s)
    return s


@triton.jit
def tau_merge_kernel(
    part_ptr, piv_ptr, state_ptr, tau_ptr, num_chunks,
    RMAX: tl.constexpr, LAST: tl.constexpr, NP: tl.constexpr, BLOCK_S: tl.constexpr,
    STEPS: tl.constexpr,
):
    """Merge one level's partials of a query head, narrow its bracket and try to certify tau."""
    pid = tl.program_id(0)
    lo = tl.load(state_ptr + pid * 4)
    hi = tl.load(state_ptr + pid * 4 + 1)
    done = tl.load(state_ptr + pid * 4 + 2) != 0
    tau_prev = tl.load(state_ptr + pid * 4 + 3)
    offs_k = tl.arange(0, NP)
    offs_s = tl.arange(0, BLOCK_S)
    pivots = tl.load(piv_ptr + pid * NP + offs_k)
    c0, c1, c2, c3, c4, cf, below, above = _empty_sums(NP)
    row = part_ptr + pid.to(tl.int64) * num_chunks * (8 * NP)
    n_read = tl.where(done, 0, num_chunks)  # a finished head keeps its state: read nothing
    for s0 in range(0, n_read, BLOCK_S):
        ss = s0 + offs_s
        m2d = (ss < num_chunks)[:, None]
        ptr = row + ss[:, None] * (8 * NP) + offs_k[None, :]
        c0 += tl.sum(tl.load(ptr + 0 * NP, mask=m2d, other=0.0), axis=0)
        c1 += tl.sum(tl.load(ptr + 1 * NP, mask=m2d, other=0.0), axis=0)
        c2 += tl.sum(tl.load(ptr + 2 * NP, mask=m2d, other=0.0), axis=0)
        c3 += tl.sum(tl.load(ptr + 3 * NP, mask=m2d, other=0.0), axis=0)
        c4 += tl.sum(tl.load(ptr + 4 * NP, mask=m2d, other=0.0), axis=0)
        cf += tl.sum(tl.load(ptr + 5 * NP, mask=m2d, other=0.0), axis=0)
        below = tl.maximum(below, tl.max(tl.load(ptr + 6 * NP, mask=m2d, other=float("-inf")), axis=0))
        above = tl.minimum(above, tl.min(tl.load(ptr + 7 * NP, mask=m2d, other=float("inf")), axis=0))
    was_done = done
    if RMAX == 1:
        f = c1
    elif RMAX == 2:
        f = c2
    elif RMAX == 3:
        f = c3
    elif RMAX == 4:
        f = c4
    else:
        f = cf
    # f is non-increasing over the pivots, and f(t_0) >= 1: k* is the last pivot with f >= 1.
    k_lo = tl.max(tl.where(f >= 1.0, offs_k, 0), axis=0)
    k_hi = tl.minimum(k_lo + 1, NP - 1)
    t_lo = _pick(pivots, offs_k, k_lo)
    t_hi = _pick(pivots, offs_k, k_hi)
    at_top = k_lo == NP - 1  # f(hi) >= 1 and tau <= hi: tau = hi

    new_lo = t_lo
    new_hi = t_hi
    new_done = at_top
    new_tau = tl.where(at_top, t_hi, 0.5 * (t_lo + t_hi))
    if RMAX > 0:
        # Support A = {z > t_hi}: h_A(s) = sum_A (z - t_hi + s)^beta, tau = t_hi - s.
        n_a = _pick(c0, offs_k, k_hi)
        a1 = _pick(c1, offs_k, k_hi)
        a2 = _pick(c2, offs_k, k_hi)
        a3 = _pick(c3, offs_k, k_hi)
        a4 = _pick(c4, offs_k, k_hi)
        width = t_hi - t_lo
        h_w, _ = _power_poly(width, n_a, a1, a2, a3, a4, RMAX)
        s_a = _root_from_right(width, n_a, a1, a2, a3, a4, RMAX, STEPS)
        tau_a = t_hi - s_a
        reach = (n_a > 0) & (h_w >= 1.0)  # then tau_a in [t_lo, t_hi] is a lower bound of tau
        ok_a = reach & (tau_a >= _pick(below, offs_k, k_hi))
        new_lo = tl.where(reach, tl.maximum(t_lo, tl.minimum(tau_a, t_hi)), new_lo)
        # Support A' = {z > t_lo}: h(s) = sum_A' (z - t_lo + s)^beta with s = t_lo - tau <= 0.
        n_b = _pick(c0, offs_k, k_lo)
        b1 = _pick(c1, offs_k, k_lo)
        b2 = _pick(c2, offs_k, k_lo)
        b3 = _pick(c3, offs_k, k_lo)
        b4 = _pick(c4, offs_k, k_lo)
        s_b = _root_from_right(tl.zeros([], tl.float32), n_b, b1, b2, b3, b4, RMAX, STEPS)
        tau_b = t_lo - s_b
        ok_b = (n_b > 0) & (tau_b <= _pick(above, offs_k, k_lo)) & (tau_b <= t_hi)
        certified = (ok_a | ok_b) & (at_top == 0)
        new_tau = tl.where(certified, tl.where(ok_a, tau_a, tau_b), new_tau)
        new_done = new_done | certified
    if LAST:
        new_done = tl.full([], 1, tl.int1)
    # A head finished at an earlier level keeps its state.
    lo_out = tl.where(was_done, lo, new_lo)
    hi_out = tl.where(was_done, hi, new_hi)
    done_out = was_done | new_done
    tau_out = tl.where(was_done, tau_prev, new_tau)
    tl.store(state_ptr + pid * 4, lo_out)
    tl.store(state_ptr + pid * 4 + 1, hi_out)
    tl.store(state_ptr + pid * 4 + 2, done_out.to(tl.float32))
    tl.store(state_ptr + pid * 4 + 3, tau_out)
    tl.store(tau_ptr + pid, tau_out)
