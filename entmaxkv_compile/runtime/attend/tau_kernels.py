"""The exact entmax threshold of one decode query in two launches: two split-parallel levels,
and the last program of each head finishes it in place.

The candidates of a query head (scores ``z`` kept by the K pass, compacted per split) are searched
for ``tau`` solving ``f(tau) = sum_i [z_i - tau]_+^beta = 1`` by *pivot levels*: a level evaluates,
at NP pivots ``t_k`` spread over the head's bracket ``[lo, hi]``, the power sums
``M_r(t_k) = sum_{z > t_k} (z - t_k)^r`` (``r <= beta`` for integer beta, else ``f(t_k)``
directly) and the nearest scores on each side of every pivot; the bracket then narrows to the
pivot interval holding tau, and the level tries to **certify**: with the support taken as
``A = {z > t_k+1}`` (or ``A' = {z > t_k}``), the root of ``sum_A (z - t)^beta = 1`` is solved from
the power sums (closed form for beta = 1, 2, a monotone Newton iteration otherwise); if it lies
on the right side of the nearest excluded (included) score, that support is the support of full
entmax and the root *is* tau (up to float32 rounding of the sums).

* ``tau_first_kernel`` (batch x query head, run of splits) runs level 1 where the candidates are:
  its pivots are log-spaced in ``M - t`` over the proven bracket
  ``lo <= tau <= M - n^(1-alpha)`` (``M`` the head's max over the split maxima, ``n`` the
  candidate capacity), where ``lo`` is the threshold of the split maxima alone (a subset's
  threshold is at most the full one; ``_floor_of_subset``), never below ``M - 1``. On flat heads
  it keeps tens of scores where ``M - 1`` keeps thousands. It first compacts the candidates above
  ``lo`` (the only ones that can be in the support) into its run's region of a survivor buffer,
  then sums over that compacted
  list, so its partial sums do not depend on how many extra candidates the K pass kept (the K
  pass's filter depends on the timing of the other programs; see ``score_kernel``).
* ``tau_second_kernel`` (same grid): every program merges level 1 (same sums, same order, so
  they agree), narrows and tries to certify; an open head's programs compact their run's
  survivors above the new ``lo`` and sum them at the level-2 pivots. On flat heads (low-rank keys)
  thousands of scores survive level 1; this keeps them spread over the grid.
* the last program of a head in ``tau_second_kernel`` (counted by an atomic ticket) merges
  level 2 the same way (``_finish_head``). A head still open gathers its survivors above the new
  ``lo`` (tens to hundreds) into one row and runs the remaining levels over them in the same
  program, each compacting the values above its ``lo``.

The cost of level 1 is one read of the candidates; the later levels read only the survivors of
open heads. For non-integer beta there is no closed certificate: eight levels bring the bracket near
float32 resolution and tau is its midpoint. A head still uncertified after the last level
(integer beta, more than ~10^4 distinct scores packed within ~1e-5 of tau) also gets the bracket's
midpoint.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Pivots per level; the slots of a partial (count, M_1..M_4, f for general beta, nearest score
# below, above); Newton steps of the scalar root solve.
NUM_PIVOTS = 16
NUM_SLOTS = 8
NEWTON_STEPS = 30
FLOOR_STEPS = 8


@triton.jit
def _empty_sums(NP: tl.constexpr):
    """Per-pivot accumulators of a level: count, M_1..M_4, f, nearest score below, above."""
    zero = tl.zeros([NP], tl.float32)
    return (zero, zero, zero, zero, zero, zero, tl.full([NP], float("-inf"), tl.float32),
            tl.full([NP], float("inf"), tl.float32))


@triton.jit
def _pivot_sums(z, t, beta, c0, c1, c2, c3, c4, cf, below, above, RMAX: tl.constexpr):
    """Add one tile of scores ``z [T]`` (-inf where empty) to the per-pivot sums at ``t [NP]``."""
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
    zz = z[:, None] + tl.zeros_like(u)
    below = tl.maximum(below, tl.max(tl.where(pos_u, float("-inf"), zz), axis=0))
    above = tl.minimum(above, tl.min(tl.where(pos_u, zz, float("inf")), axis=0))
    return c0, c1, c2, c3, c4, cf, below, above


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
    support's range (s0 itself when h(s0) <= 1).

    beta = 1 and 2 in closed form (a line; the larger root of c0 s^2 + 2 c1 s + c2 - 1 in the
    form without cancellation, c1 >= 0) and one Newton step against its rounding: a serial
    Newton walk cost ~0.1 us per step, 60 steps per level. beta = 3, 4: Newton from the right,
    which decreases monotonically onto the root.
    """
    h0, _ = _power_poly(s0, c0, c1, c2, c3, c4, RMAX)
    if RMAX == 1:
        s = tl.where(c0 > 0, (1.0 - c1) / tl.maximum(c0, 1e-30), s0)
    elif RMAX == 2:
        den = c1 + tl.sqrt(tl.maximum(c1 * c1 + c0 * (1.0 - c2), 0.0))
        s = tl.where(den > 0, (1.0 - c2) / tl.maximum(den, 1e-30), 0.0)
        h, dh = _power_poly(s, c0, c1, c2, c3, c4, RMAX)
        s = tl.where(dh > 0, s - (h - 1.0) / tl.maximum(dh, 1e-30), s)
    else:
        s = s0
        for _ in tl.static_range(STEPS):
            h, dh = _power_poly(s, c0, c1, c2, c3, c4, RMAX)
            step = (h - 1.0) / tl.maximum(dh, 1e-30)
            s = tl.where(h > 1.0, s - step, s)
    return tl.where(h0 > 1.0, tl.minimum(s, s0), s0)


@triton.jit
def _narrow(c0, c1, c2, c3, c4, cf, below, above, pivots, last,
            RMAX: tl.constexpr, NP: tl.constexpr, STEPS: tl.constexpr):
    """One level's outcome from its summed partials: ``(lo, hi, done, tau)``.

    The bracket narrows to the pivot interval holding tau; with integer beta the two candidate
    supports on its ends are tried for a closed-form certificate (see the module doc).
    """
    offs_k = tl.arange(0, NP)
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
    new_done = at_top | last
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
    return new_lo, t_hi, new_done, new_tau


@triton.jit
def _append_above(z, lo, dst, kept):
    """Append the scores of tile ``z`` that lie above ``lo`` to ``dst`` after its first ``kept``
    entries, in order; returns the new count."""
    keep = (z > lo).to(tl.int32)
    found = tl.sum(keep, axis=0)
    if found > 0:  # most tiles of a flat head's candidates lie below a tight lo: no scan, no store
        pos = kept + tl.cumsum(keep, axis=0) - keep
        tl.store(dst + pos, z, mask=keep > 0)
    return kept + found


@triton.jit
def _floor_of_subset(z, big_m, beta, RMAX: tl.constexpr, STEPS: tl.constexpr):
    """A lower bound of tau from a few of the head's scores ``z`` (-inf where absent; here the
    splits' maxima): the threshold of any subset of the scores is at most the full one (adding a
    score only raises it), and Newton's method on ``f(t) = sum_z [z - t]_+^beta = 1`` started at
    ``M - 1`` (where ``f >= 1``) climbs to that subset's threshold from below, every iterate a
    lower bound (f is convex and decreasing). On flat heads (low-rank keys, recorded activations)
    this keeps tens of scores above the bound where ``M - 1`` keeps thousands. The result is
    lowered by a margin for the float32 rounding of the sums and never goes below ``M - 1``."""
    has = big_m > float("-inf")
    t = tl.where(has, big_m - 1.0, 0.0)  # a head without scores stays at 0 (no -inf - -inf)
    for _ in tl.static_range(STEPS):
        u = tl.maximum(z - t, 0.0)
        if RMAX == 1:
            f = tl.sum(u, axis=0)
            df = tl.sum((u > 0).to(tl.float32), axis=0)
        elif RMAX == 2:
            f = tl.sum(u * u, axis=0)
            df = 2.0 * tl.sum(u, axis=0)
        else:
            pw = tl.where(u > 0, tl.exp2(beta * tl.log2(tl.where(u > 0, u, 1.0))), 0.0)
            f = tl.sum(pw, axis=0)
            df = beta * tl.sum(tl.where(u > 0, pw / tl.where(u > 0, u, 1.0), 0.0), axis=0)
        t = tl.where((f > 1.0) & (df > 0), t + (f - 1.0) / tl.maximum(df, 1e-30), t)
    margin = 1e-3 * (big_m - t) + 1e-5 * tl.maximum(tl.abs(t), 1.0)
    return tl.where(has, tl.maximum(t - margin, big_m - 1.0), float("-inf"))


@triton.jit
def tau_first_kernel(
    cand_z_ptr, cand_cnt_ptr, split_max_ptr, surv_ptr, surv_cnt_ptr, state_ptr, part_ptr, piv_ptr,
    ticket_ptr, Hq, Hkv, G, num_splits, seg, alpha_m1, beta, log2_cap, splits_per_prog, num_chunks,
    RMAX: tl.constexpr, NP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, FLOOR_STEPS: tl.constexpr,
):
    """Level 1 over a run of splits' candidates of one query head (see the module doc).

    ``cand_cnt`` is indexed by (batch, KV head, split): the group shares the K pass's counts.
    ``state`` receives per head ``lo, hi, live, tau`` (tau: what a head that never runs keeps).
    ``BLOCK_R`` >= ``splits_per_prog``: the run's counts load as one vector beside the split
    maxima, not one round trip per split inside the loop (14 splits per run at batch 8).
    """
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // Hq
    h = pid % Hq
    hk = h // G
    cap = num_splits * seg
    offs_k = tl.arange(0, NP)
    kf = offs_k.to(tl.float32)

    offs_r = tl.arange(0, BLOCK_R)
    first_split = chunk * splits_per_prog
    in_run = (offs_r < splits_per_prog) & (first_split + offs_r < num_splits)
    run_counts = tl.load(cand_cnt_ptr + (b * Hkv + hk) * num_splits + first_split + offs_r, mask=in_run, other=0)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < num_splits
    smax = tl.load(split_max_ptr + pid * num_splits + offs_s, mask=smask, other=float("-inf"))
    poisoned = tl.max((smax != smax).to(tl.int32), axis=0) > 0  # an attended NaN/+inf score
    smax = tl.where(smax != smax, float("-inf"), smax)
    big_m = tl.max(smax, axis=0)
    live = (big_m > float("-inf")) & (poisoned == 0)
    lo = _floor_of_subset(smax, big_m, beta, RMAX, FLOOR_STEPS)
    # d_k = M - t_k, log-spaced from M - lo down to n^(1-alpha) (tau's proven range); t_0 = lo.
    ld_lo = tl.log2(tl.maximum(big_m - lo, 1e-30))
    ld_min = tl.minimum(-alpha_m1 * log2_cap, ld_lo)
    t = tl.where(offs_k == 0, lo, big_m - tl.exp2(ld_lo + (ld_min - ld_lo) * kf / (NP - 1)))

    # 1. Compact the candidates above lo into this run's region, in token order (tiles of
    # BLOCK_K: on flat heads most tokens are candidates and this loop streams them).
    offs_c = tl.arange(0, BLOCK_K)
    out = surv_ptr + pid.to(tl.int64) * cap + first_split * seg
    kept = tl.zeros([], tl.int32)
    run_counts = tl.where(live, run_counts, 0)
    for split in range(first_split, tl.minimum(first_split + splits_per_prog, num_splits)):
        count = tl.sum(tl.where(offs_r == split - first_split, run_counts, 0), axis=0)
        src = cand_z_ptr + pid.to(tl.int64) * cap + split * seg
        for i in range(0, count, BLOCK_K):
            ii = i + offs_c
            z = tl.load(src + ii, mask=ii < count, other=float("-inf"))
            kept = _append_above(z, lo, out, kept)
    tl.store(surv_cnt_ptr + pid * num_chunks + chunk, kept)
    tl.debug_barrier()  # the sums below read what the other threads just wrote

    # 2. The level's sums over the compacted list (its order does not depend on the K pass).
    offs_t = tl.arange(0, BLOCK_T)
    c0, c1, c2, c3, c4, cf, below, above = _empty_sums(NP)
    for i in range(0, kept, BLOCK_T):
        ii = i + offs_t
        z = tl.load(out + ii, mask=ii < kept, other=float("-inf"))
        c0, c1, c2, c3, c4, cf, below, above = _pivot_sums(
            z, t, beta, c0, c1, c2, c3, c4, cf, below, above, RMAX)

    _store_sums(part_ptr + (pid.to(tl.int64) * num_chunks + chunk) * (8 * NP),
                c0, c1, c2, c3, c4, cf, below, above, NP)
    if chunk == 0:
        tl.store(ticket_ptr + pid, 0)
        tl.store(piv_ptr + pid * NP + offs_k, t)
        tl.store(state_ptr + pid * 4, lo)
        tl.store(state_ptr + pid * 4 + 1, tl.max(t, axis=0))
        tl.store(state_ptr + pid * 4 + 2, tl.where(live, 1.0, 0.0))
        # A head that never runs keeps this tau: NaN if poisoned, +inf if it has nothing to
        # attend (its output is then 0).
        tl.store(state_ptr + pid * 4 + 3, tl.where(poisoned, float("nan"), float("inf")))


@triton.jit
def _merged_sums(part_ptr, pid, num_chunks, BLOCK_C: tl.constexpr, NP: tl.constexpr):
    """A level's partials of one query head, added in chunk order (deterministic)."""
    offs_k = tl.arange(0, NP)
    offs_c = tl.arange(0, BLOCK_C)
    ptr = part_ptr + pid.to(tl.int64) * num_chunks * (8 * NP) + offs_c[:, None] * (8 * NP) \
        + offs_k[None, :]
    m2d = (offs_c < num_chunks)[:, None]
    c0 = tl.sum(tl.load(ptr + 0 * NP, mask=m2d, other=0.0), axis=0)
    c1 = tl.sum(tl.load(ptr + 1 * NP, mask=m2d, other=0.0), axis=0)
    c2 = tl.sum(tl.load(ptr + 2 * NP, mask=m2d, other=0.0), axis=0)
    c3 = tl.sum(tl.load(ptr + 3 * NP, mask=m2d, other=0.0), axis=0)
    c4 = tl.sum(tl.load(ptr + 4 * NP, mask=m2d, other=0.0), axis=0)
    cf = tl.sum(tl.load(ptr + 5 * NP, mask=m2d, other=0.0), axis=0)
    below = tl.max(tl.load(ptr + 6 * NP, mask=m2d, other=float("-inf")), axis=0)
    above = tl.min(tl.load(ptr + 7 * NP, mask=m2d, other=float("inf")), axis=0)
    return c0, c1, c2, c3, c4, cf, below, above


@triton.jit
def _store_sums(base, c0, c1, c2, c3, c4, cf, below, above, NP: tl.constexpr):
    """One program's partial of a level (8 slots of NP pivots at ``base``)."""
    offs_k = tl.arange(0, NP)
    tl.store(base + 0 * NP + offs_k, c0)
    tl.store(base + 1 * NP + offs_k, c1)
    tl.store(base + 2 * NP + offs_k, c2)
    tl.store(base + 3 * NP + offs_k, c3)
    tl.store(base + 4 * NP + offs_k, c4)
    tl.store(base + 5 * NP + offs_k, cf)
    tl.store(base + 6 * NP + offs_k, below)
    tl.store(base + 7 * NP + offs_k, above)


@triton.jit
def _compact_and_sum(src, dst, n, lo, t, beta, RMAX: tl.constexpr, NP: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    """One pivot level over the ``n`` scores at ``src``: the per-pivot sums at ``t [NP]``, and
    the scores above ``lo`` compacted to ``dst`` in order. Returns ``(kept, sums...)``."""
    s0, s1, s2, s3, s4, sf, sb, sa = _empty_sums(NP)
    kept = tl.zeros([], tl.int32)
    offs_t = tl.arange(0, BLOCK_T)
    for i in range(0, n, BLOCK_T):
        ii = i + offs_t
        z = tl.load(src + ii, mask=ii < n, other=float("-inf"))
        kept = _append_above(z, lo, dst, kept)
        s0, s1, s2, s3, s4, sf, sb, sa = _pivot_sums(z, t, beta, s0, s1, s2, s3, s4, sf, sb, sa, RMAX)
    return kept, s0, s1, s2, s3, s4, sf, sb, sa


@triton.jit
def tau_second_kernel(
    part1_ptr, piv1_ptr, state1_ptr, surv_ptr, cnt1_ptr,
    part2_ptr, piv2_ptr, state2_ptr, cnt2_ptr, ticket_ptr, tau_ptr,
    rows, cap, chunk_len, num_chunks, beta, levels,
    RMAX: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TC: tl.constexpr,
    BLOCK_T: tl.constexpr, STEPS: tl.constexpr,
):
    """Level 2, split-parallel like level 1: every program merges level 1 (the same sums in the
    same order, so all agree), and an open head's programs compact their run's survivors above
    the new lo from plane 0 into plane 1 of ``surv`` ``[2, rows, cap]`` and sum them at the new
    pivots. Flat heads keep thousands of survivors after level 1; this level spreads them over
    the grid. Then each program takes a ticket (an atomic add, which orders its stores before
    it); the head's last program merges level 2 and finishes the head alone
    (:func:`_finish_head`), so the finish costs no launch of its own. ``tau_first_kernel``
    zeroes the tickets."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_k = tl.arange(0, NP)
    kf = offs_k.to(tl.float32)
    # All that level 1 left for this program, loaded at once (tau_first_kernel writes each of
    # these for every head, live or not): on a small selection this kernel is a chain of global
    # round trips, not work, and loads under the branches below would each add one.
    live = tl.load(state1_ptr + pid * 4 + 2) != 0
    tau = tl.load(state1_ptr + pid * 4 + 3)
    lo = tl.load(state1_ptr + pid * 4)
    hi = tl.load(state1_ptr + pid * 4 + 1)
    c0, c1, c2, c3, c4, cf, below, above = _merged_sums(part1_ptr, pid, num_chunks, BLOCK_C, NP)
    pivots = tl.load(piv1_ptr + pid * NP + offs_k)
    count = tl.load(cnt1_ptr + pid * num_chunks + chunk)
    done = live == 0
    kept = tl.zeros([], tl.int32)
    s0, s1, s2, s3, s4, sf, sb, sa = _empty_sums(NP)
    if live:
        lo, hi, done, tau = _narrow(c0, c1, c2, c3, c4, cf, below, above, pivots, pid < 0,
                                    RMAX, NP, STEPS)
        if done == 0:
            t = lo + (hi - lo) * kf / (NP - 1)
            off = pid.to(tl.int64) * cap + chunk * chunk_len
            kept, s0, s1, s2, s3, s4, sf, sb, sa = _compact_and_sum(
                surv_ptr + off, surv_ptr + (pid.to(tl.int64) * 0 + rows) * cap + off, count, lo, t, beta,
                RMAX, NP, BLOCK_T)
            if chunk == 0:
                tl.store(piv2_ptr + pid * NP + offs_k, t)
    _store_sums(part2_ptr + (pid.to(tl.int64) * num_chunks + chunk) * (8 * NP),
                s0, s1, s2, s3, s4, sf, sb, sa, NP)
    tl.store(cnt2_ptr + pid * num_chunks + chunk, kept)
    if chunk == 0:
        tl.store(state2_ptr + pid * 4, lo)
        tl.store(state2_ptr + pid * 4 + 1, hi)
        tl.store(state2_ptr + pid * 4 + 2, tl.where(done, 0.0, 1.0))
        tl.store(state2_ptr + pid * 4 + 3, tau)
    tl.debug_barrier()  # every thread's stores are issued before the ticket releases them
    ticket = tl.atomic_add(ticket_ptr + pid, 1)
    if ticket == num_chunks - 1:
        _finish_head(pid, part2_ptr, piv2_ptr, state2_ptr, surv_ptr, cnt2_ptr, tau_ptr,
                     rows, cap, chunk_len, num_chunks, beta, levels,
                     RMAX, NP, BLOCK_C, BLOCK_TC, BLOCK_T, STEPS)


@triton.jit
def _finish_head(
    pid, part_ptr, piv_ptr, state_ptr, surv_ptr, surv_cnt_ptr, tau_ptr,
    rows, cap, chunk_len, num_chunks, beta, levels,
    RMAX: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TC: tl.constexpr,
    BLOCK_T: tl.constexpr, STEPS: tl.constexpr,
):
    """Merge level 2 of query head ``pid``, then run levels 3..``levels`` over its survivors.

    ``surv`` is ``[2, rows, cap]``: plane 1 holds level 2's survivors by run (``chunk_len``
    apart); they are gathered into plane 0's row, and the later levels alternate between the
    two planes' rows.
    """
    # Loaded at once, open or not (every program of the head wrote its partial and count; the
    # pivots are read only when open, and then were written), as in tau_second_kernel.
    open_ = tl.load(state_ptr + pid * 4 + 2) != 0
    tau = tl.load(state_ptr + pid * 4 + 3)
    offs_k = tl.arange(0, NP)
    offs_c = tl.arange(0, BLOCK_C)
    c0, c1, c2, c3, c4, cf, below, above = _merged_sums(part_ptr, pid, num_chunks, BLOCK_C, NP)
    pivots = tl.load(piv_ptr + pid * NP + offs_k)
    counts = tl.load(surv_cnt_ptr + pid * num_chunks + offs_c, mask=offs_c < num_chunks, other=0)
    if open_:
        kf = offs_k.to(tl.float32)
        lo, hi, done, tau = _narrow(c0, c1, c2, c3, c4, cf, below, above, pivots, levels <= 2,
                                    RMAX, NP, STEPS)
        if done == 0:
            # Gather the survivors above lo from the runs' regions of plane 1 into plane 0.
            plane = (pid.to(tl.int64) * 0 + rows) * cap  # rows may arrive as a constexpr 1
            row0 = surv_ptr + pid.to(tl.int64) * cap
            offs_tc = tl.arange(0, BLOCK_TC)
            n = tl.zeros([], tl.int32)
            for i in range(0, tl.max(counts, axis=0), BLOCK_TC):
                ii = i + offs_tc
                z = tl.load(row0 + plane + offs_c[:, None] * chunk_len + ii[None, :],
                            mask=ii[None, :] < counts[:, None], other=float("-inf"))
                n = _append_above(tl.reshape(z, (BLOCK_C * BLOCK_TC,)), lo, row0, n)
            tl.debug_barrier()
            # The remaining levels, each over the values above its lo.
            for level in range(2, levels):
                if done == 0:
                    t = lo + (hi - lo) * kf / (NP - 1)
                    kept, s0, s1, s2, s3, s4, sf, sb, sa = _compact_and_sum(
                        row0 + (level % 2) * plane, row0 + (1 - level % 2) * plane, n, lo, t, beta,
                        RMAX, NP, BLOCK_T)
                    tl.debug_barrier()
                    n = kept
                    lo, hi, done, tau = _narrow(s0, s1, s2, s3, s4, sf, sb, sa, t,
                                                level == levels - 1, RMAX, NP, STEPS)
    tl.store(tau_ptr + pid, tau)
