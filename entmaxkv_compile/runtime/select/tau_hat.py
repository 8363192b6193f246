"""Device-side Gaussian threshold estimate tau_hat (single Gaussian and page mixture).

Solves ``sum_c n_c E[[(alpha-1) S_c - tau]_+^beta] = 1`` with ``S_c ~ N(mu_c, sigma_c^2)`` for
integer beta (alpha in {2, 1.5, 4/3, 1.25}: beta 1..4); the mixture has one program per
(batch, query head).
Truncated moments ``M_k = E[Y_+^k]`` of ``Y ~ N(m, s^2)`` come from the recursion
``M_k = m M_{k-1} + (k-1) s^2 M_{k-2}`` with ``M_0 = Phi(t)``, ``M_1 = m Phi(t) + s phi(t)``,
``t = m/s`` (the closed forms of ``_truncated_moments.py``, e.g. the corrected
``M_3 = (m^3 + 3 m s^2) Phi + (m^2 s + 2 s^3) phi``). ``Phi`` uses a Chebyshev erfc fit with
relative error below 1.2e-7 everywhere, so the Gaussian tail (where the root lies for long
contexts) keeps its relative precision. The solve is a Newton iteration inside a bracket that
provably contains the root (f is convex and decreasing for beta >= 1, so it is monotone),
bisection when a step leaves the bracket, early exit at convergence, a fixed cap. The
single-Gaussian solve is serial latency on one scalar per head, so it starts close: an
asymptotic guess (:func:`_tail_guess`), a float32 log-space pass, then float64 log-space steps
from that (:func:`single_gaussian_tau`, run by the keep kernel of the selection itself, one
launch fewer per step).
"""

from __future__ import annotations

import functools
import math

import triton
import triton.language as tl

MAX_ITERS = 64


@functools.cache  # the selection's launcher asks every step
def tail_constants(beta: int) -> tuple[float, float]:
    """``(log beta!, log E[Z_+^beta])`` for :func:`_tail_guess` (Z standard normal;
    ``E[Z_+^beta] = 2^(beta/2 - 1) Gamma((beta + 1) / 2) / sqrt(pi)``)."""
    log_m0 = (beta / 2 - 1) * math.log(2.0) + math.lgamma((beta + 1) / 2) - 0.5 * math.log(math.pi)
    return math.lgamma(beta + 1), log_m0


@triton.jit
def _erfc(x):
    """erfc(x) with relative error < 1.2e-7 (Chebyshev fit), elementwise, any float dtype."""
    z = tl.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    r = t * tl.exp(-z * z + poly)
    return tl.where(x >= 0, r, 2.0 - r)


@triton.jit
def _moments(m, s, BETA: tl.constexpr):
    """(M_beta, M_{beta-1}) of Y ~ N(m, s^2) truncated at 0; s == 0 gives [m]_+^k."""
    pos_s = s > 0
    s_safe = tl.where(pos_s, s, 1.0)
    t = m / s_safe
    cdf = tl.where(pos_s, 0.5 * _erfc(-t * 0.7071067811865476), tl.where(m > 0, 1.0, 0.0))
    pdf = tl.where(pos_s, 0.3989422804014327 * tl.exp(-0.5 * t * t), 0.0)
    m0 = cdf
    m1 = m * cdf + s * pdf
    prev = m0
    cur = m1
    for k in tl.static_range(2, BETA + 1):
        nxt = m * cur + (k - 1) * s * s * prev
        prev = cur
        cur = nxt
    return cur, prev


@triton.jit
def _gaussian_newton(center, s, n, lo, hi, t, BETA: tl.constexpr, MAX_IT: tl.constexpr,
                     RTOL: tl.constexpr, TINY: tl.constexpr, LOG: tl.constexpr):
    """Newton on ``f(t) = n M_beta(center - t, s) - 1`` inside [lo, hi], bisection when a step
    leaves the bracket; elementwise over vectors (each lane stops on its own; the loop runs
    until every lane has), in the dtype of its arguments. Plain (``LOG=False``): from ``t`` left of
    the root, monotone since f is convex and decreasing. ``LOG=True``: Newton on
    ``log(n M_beta)``, which is concave (M_beta is log-concave), so after one step the iterates
    approach from the right, quadratically even deep in the Gaussian tail where plain Newton
    gains only a factor e per step. Done when a step moves ``t`` by at most ``RTOL (1 + |t|)``
    (near the root Newton's next error is about the square of that step), the bracket is that
    narrow, or ``f`` is 0."""
    it = tl.zeros([], tl.int32)
    done = t != t  # per lane: a lane that has converged keeps its t
    while (it < MAX_IT) & (tl.min(done.to(tl.int32), axis=0) == 0):
        mb, mb1 = _moments(center - t, s, BETA)
        f = n * mb - 1.0
        lo = tl.where(f > 0, t, lo)
        hi = tl.where(f > 0, hi, t)
        if LOG:
            step = t + tl.log(tl.maximum(n * mb, TINY)) * mb / tl.maximum(BETA * mb1, TINY)
        else:
            step = t + f / tl.maximum(n * BETA * mb1, TINY)
        t_new = tl.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
        tol = RTOL * (1.0 + tl.abs(t))
        settled = (f == 0) | (tl.abs(t_new - t) <= tol) | (hi - lo <= tol)
        t = tl.where(done | (f == 0), t, t_new)
        done = done | settled | (t != t)
        it += 1
    return t


@triton.jit
def _tail_guess(center, s, n, log_gamma, log_m0, BETA: tl.constexpr):
    """A start for the single-Gaussian solve. With ``x = (t - center) / s`` the equation reads
    ``log m(x) = L = -log n - beta log s``, ``m(x) = E[(Z - x)_+^beta]``: left of 0 (``L >= log
    m(0)``, ``log_m0``) ``m(x) ~ (-x)^beta``; right of it ``m(x) ~ beta! phi(x) (2 / (x +
    sqrt(x^2 + 2 beta + 4)))^(beta + 1)``, which agrees with m's asymptotic series to its x^-2
    term, solved for x by three fixed-point steps (``log_gamma = log beta!``). For s = 0 this
    is ``center`` (the bracket's right end, which the caller replaces by its left end)."""
    big_l = -tl.log(n) - BETA * tl.log(tl.where(s > 0, s, 1.0))
    x = tl.zeros_like(big_l) + 1.0
    for _ in tl.static_range(3):
        r = log_gamma - 0.9189385332046727 + (BETA + 1) * tl.log(2.0 / (x + tl.sqrt(x * x + 2.0 * BETA + 4.0)))
        x = tl.sqrt(tl.maximum(2.0 * (r - big_l), 0.0))
    x = tl.where(big_l >= log_m0, -tl.exp(big_l / BETA), x)
    return center + s * x


@triton.jit
def single_gaussian_tau(mom_ptr, length, start_ptr, b, heads, gmask, Hq, num_blocks, am1, page_size,
                        log_gamma, log_m0, HAS_START: tl.constexpr, BETA: tl.constexpr,
                        BLOCK_B: tl.constexpr, MAX_IT: tl.constexpr):
    """tau_hat (float32) of query ``heads`` of row ``b`` (``length`` tokens, int32, as the caller
    loaded it) under the single Gaussian: reduce the
    moments kernel's per-program count-weighted sums ``[B, Hq, num_blocks, 2]`` (float64), then
    solve from :func:`_tail_guess`: a float32 log-space Newton pass (fast special functions) to
    ~1e-5, then float64 log-space steps from there to ~1e-10 (about 3 + 2 evaluations where a
    float32 pass from the bracket's end and a float64 pass from the left took about 10 + 6: the
    solve is serial latency; the root agrees with a cold float64 solve's to ~1e-10 relative).
    An empty row (length 0: nothing to select) gives +inf without solving."""
    offs = tl.arange(0, BLOCK_B)
    s1 = (heads * 0).to(tl.float64)
    s2 = s1
    base = mom_ptr + (b * Hq + heads).to(tl.int64)[:, None] * num_blocks * 2
    # The sums are not masked by the length (the keep kernel loads them beside it, a round trip
    # less on a serial kernel); an empty row's were never written, so they are dropped here.
    for i in range(0, num_blocks, BLOCK_B):
        mask = gmask[:, None] & ((i + offs) < num_blocks)[None, :]
        s1 += tl.sum(tl.load(base + (i + offs)[None, :] * 2, mask=mask, other=0.0), axis=1)
        s2 += tl.sum(tl.load(base + (i + offs)[None, :] * 2 + 1, mask=mask, other=0.0), axis=1)
    s1 = tl.where(length > 0, s1, 0.0)
    s2 = tl.where(length > 0, s2, 0.0)
    n = tl.maximum(length, 1).to(tl.float64)
    if HAS_START:  # the tokens of the pages from the start's page on (at least 1, as the reference)
        first = tl.maximum(tl.load(start_ptr + b).to(tl.int32), 0) // page_size
        n = tl.maximum(n - (first * page_size).to(tl.float64), 1.0)
    mu = s1 / n
    var = tl.maximum(s2 / n - mu * mu, 0.0)
    s = am1 * tl.sqrt(var)
    center = am1 * mu
    lo = center - 1.0 - 8.0 * s
    hi = center + s * (tl.sqrt(2.0 * tl.log(n + 1.0)) + 8.0)
    c32 = center.to(tl.float32)
    s32 = s.to(tl.float32)
    n32 = n.to(tl.float32)
    lo32 = lo.to(tl.float32)
    hi32 = hi.to(tl.float32)
    t0 = _tail_guess(c32, s32, n32, log_gamma, log_m0, BETA)
    t0 = tl.where((t0 > lo32) & (t0 < hi32), t0, lo32)
    t32 = _gaussian_newton(c32, s32, n32, lo32, hi32, t0, BETA, MAX_IT, 1e-5, 1e-30, True)
    t = _gaussian_newton(center, s, n, lo, hi, t32.to(tl.float64), BETA, MAX_IT, 1e-10, 1e-300, True)
    return tl.where(length > 0, t.to(tl.float32), float("inf"))


@triton.jit
def mixture_tau_kernel(
    mu_ptr, sigma_ptr, seqlens_ptr, start_ptr, tau_ptr, Hq, num_pages, page_size, am1,
    HAS_START: tl.constexpr, BETA: tl.constexpr, BLOCK_P: tl.constexpr, MAX_IT: tl.constexpr,
):
    """Mixture of per-page Gaussians weighted by page token counts (the ALiBi estimate); with
    ``HAS_START`` the pages wholly below the row's start weigh nothing."""
    pid = tl.program_id(0)
    b = pid // Hq
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    if length == 0:  # nothing to select (a certified step reading densely)
        tl.store(tau_ptr + pid, float("inf"))
        return
    first = tl.zeros([], tl.int32)
    if HAS_START:
        first = tl.maximum(tl.load(start_ptr + b).to(tl.int32), 0) // page_size
    base = pid.to(tl.int64) * num_pages
    offs = tl.arange(0, BLOCK_P)
    top = tl.full([BLOCK_P], float("-inf"), tl.float32)
    spread = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, num_pages, BLOCK_P):
        pages = p0 + offs
        n = tl.minimum(tl.maximum(length - pages * page_size, 0), page_size)
        ok = (n > 0) & (pages >= first)
        mu = tl.load(mu_ptr + base + pages, mask=ok, other=0.0)
        sg = tl.load(sigma_ptr + base + pages, mask=ok, other=0.0)
        top = tl.maximum(top, tl.where(ok, am1 * mu, float("-inf")))
        spread = tl.maximum(spread, tl.where(ok, am1 * sg, 0.0))
    top_c = tl.max(top, axis=0)
    s_max = tl.max(spread, axis=0)
    total = tl.maximum(length - first * page_size, 1).to(tl.float32)
    lo = top_c - 1.0 - 8.0 * s_max
    hi = top_c + s_max * (tl.sqrt(2.0 * tl.log(total + 1.0)) + 8.0)
    t = lo
    it = tl.zeros([], tl.int32)
    done = it < 0
    while (it < MAX_IT) & (done == 0):
        f = tl.zeros([], tl.float32) - 1.0
        fp = tl.zeros([], tl.float32)
        for p0 in range(0, num_pages, BLOCK_P):
            pages = p0 + offs
            n = tl.minimum(tl.maximum(length - pages * page_size, 0), page_size)
            ok = (n > 0) & (pages >= first)
            mu = tl.load(mu_ptr + base + pages, mask=ok, other=0.0)
            sg = tl.load(sigma_ptr + base + pages, mask=ok, other=0.0)
            mb, mb1 = _moments(am1 * mu - t, am1 * sg, BETA)
            w = n.to(tl.float32)
            f += tl.sum(tl.where(ok, w * mb, 0.0), axis=0)
            fp += tl.sum(tl.where(ok, w * mb1, 0.0), axis=0)
        lo = tl.where(f > 0, t, lo)
        hi = tl.where(f > 0, hi, t)
        step = t + f / tl.maximum(BETA * fp, 1e-30)
        t_new = tl.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
        done = (f == 0) | (t_new == t) | (hi - lo <= 1e-6 * (1.0 + tl.abs(t)))
        t = tl.where(f == 0, t, t_new)
        it += 1
    tl.store(tau_ptr + pid, t)
