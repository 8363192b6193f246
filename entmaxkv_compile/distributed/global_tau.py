"""The exact entmax threshold of scores spread over ranks: a few small collectives, no score moved
but the handful next to the threshold.

Each rank holds some of a query head's attended scores ``x`` (its share of the sequence). Full
entmax needs the one ``tau`` with ``sum_i [z_i - tau]_+^beta = 1`` over *all* of them
(``z = (alpha-1) x``, ``beta = 1/(alpha-1)``). This is the split-parallel threshold of the decode
kernels (``runtime/attend/tau_kernels.py``) with ranks as splits:

1. ``all_reduce(MAX)`` of each head's local max (and of a "saw a NaN/+inf" flag): every rank then
   works on ``u = (alpha-1)(x - max x) <= 0``, and ``tau_u`` lies in the proven bracket ``[-1, 0)``
   (the max alone contributes ``1^beta`` at ``-1``; nothing contributes at 0).
2. *Levels* (integer ``beta``, i.e. alpha in {2, 1.5, 4/3, 1.25}): the bracket is cut into ``bins``
   equal bins; each rank adds, per bin, the power sums ``S_r = sum (u - e_j)^r`` (``r <= beta``,
   ``e_j`` the bin's lower edge; one more bin for ``u`` above the bracket) and one
   ``all_reduce(SUM)`` merges them. From them every rank evaluates
   ``f(e_k) = sum_{u > e_k} (u - e_k)^beta`` at every edge by the binomial expansion of
   ``(u - e_k) = (u - e_j) + (e_j - e_k)`` (all terms non-negative: no cancellation), and narrows
   the bracket to the bin where ``f`` crosses 1. The merged sums are identical on every rank, so
   every rank narrows the same way. A bin shrinks the bracket ``bins``-fold per level.
3. *Finish*: the scores still inside the final bracket ``(lo, hi]`` are few (the merged count says
   how many); each rank contributes up to ``gather_cap`` of them to one ``all_gather``. Every rank
   then knows ``f`` exactly on the bracket: the power sums of the scores above ``hi`` (from the last
   level, expanded about ``hi``) plus the gathered scores, read directly. The support is the
   gathered prefix whose ``f`` stays below 1, and ``tau`` is the root of ``f = 1`` on it, found by a
   monotone Newton iteration from the left (``f`` is convex and decreasing there), i.e. the
   closed form of ``beta = 1`` and the polynomial root otherwise. When the final bracket holds no
   score at all this is the closed-form certificate of the kernels (support = everything above
   ``hi``); with a few scores it is the exact sort-based solve of those few.
   A head whose final bracket still holds more than ``gather_cap`` scores (more than that many
   distinct scores packed within ``bins**-levels`` of tau) gets the root over what was gathered
   and ``exact = False``: the caller must not certify it.

Non-integer ``beta`` has no power-sum merge: each level evaluates ``f`` directly at ``pivots``
points of the bracket (one ``all_reduce(SUM)`` of ``pivots`` numbers per head) and the levels run
until the bracket is within a few ulps of the compute dtype; tau is its midpoint, as exact as the
single-process bracketed solve of ``math/reference.py``.

Everything is fixed-shape and free of host syncs: the number of collectives depends only on
static settings, never on data, so the ranks cannot fall out of step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..math.reference import entmax_beta
from ..runtime._common import integer_beta
from .collectives import Collectives

__all__ = ["GlobalThreshold", "TauSettings", "combine_output", "global_threshold", "sum_and_normalize"]

_NEWTON_STEPS = 30
_SPARE_SLOTS = 64


class TauSettings(NamedTuple):
    """How the global threshold is searched: ``bins`` per level and ``levels`` (integer beta),
    ``gather_cap`` scores per rank and head at the finish, ``pivots`` per level for non-integer
    beta (whose level count follows from the dtype); ``kernel_cap`` scores per rank and head
    above the largest local threshold on the kernel path (``local_kernels.py``), gathered again
    with room for up to ``kernel_max_cap`` when a head has more."""

    bins: int = 256
    levels: int = 2
    gather_cap: int = 32
    pivots: int = 64
    kernel_cap: int = 1024
    kernel_max_cap: int = 65536

    def validated(self) -> "TauSettings":
        for name, value, minimum in (("bins", self.bins, 2), ("levels", self.levels, 1),
                                     ("gather_cap", self.gather_cap, 1), ("pivots", self.pivots, 2),
                                     ("kernel_cap", self.kernel_cap, 1),
                                     ("kernel_max_cap", self.kernel_max_cap, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        return self


class GlobalThreshold(NamedTuple):
    """The solve's result over the local scores: ``u`` ``[..., C]`` (``(alpha-1)(x - max x)``,
    ``-inf`` where not attended), ``valid`` its attended finite entries, ``tau_u [...]`` the global
    threshold in ``u`` units (``+inf`` with nothing attended anywhere, NaN where some rank attended
    a NaN/``+inf`` score), ``tau`` the threshold in ``z`` units (``(alpha-1) max x + tau_u``) and
    ``exact`` (bool ``[...]``) where the solve closed (see the module doc); ``lower`` a proven
    lower bound of the threshold in ``z`` units (``tau`` where exact, else the final bracket's
    lower end), which is what a certificate may rest on."""

    u: torch.Tensor
    valid: torch.Tensor
    tau_u: torch.Tensor
    tau: torch.Tensor
    exact: torch.Tensor
    lower: torch.Tensor


def global_threshold(comm: Collectives, x: torch.Tensor, attended: torch.Tensor, alpha: float,
                     settings: TauSettings = TauSettings()) -> GlobalThreshold:
    """The exact entmax threshold of each row of scores ``x [..., C]`` (the local part of every
    rank's row, ``attended`` a bool mask broadcastable to ``x``), over all ranks of ``comm``.

    Every rank must call it with the same leading shape, ``alpha`` and ``settings``; ``x`` in the
    compute dtype (float32, float64 for the exactness path).
    """
    attended = torch.broadcast_to(attended, x.shape)
    poisoned = (attended & (torch.isnan(x) | (x == float("inf")))).any(-1)
    valid = attended & torch.isfinite(x)
    packed = torch.stack([torch.where(valid, x, float("-inf")).amax(-1), poisoned.to(x.dtype)], -1)
    comm.max_(packed)
    xmax, poisoned = packed[..., 0], packed[..., 1] > 0
    anything = torch.isfinite(xmax)
    shift = torch.where(anything, xmax, 0.0)
    u = torch.where(valid, (x - shift[..., None]) * (alpha - 1.0), float("-inf"))
    valid = valid & (u != float("-inf"))
    beta = integer_beta(alpha)
    if beta is None:
        tau_u, exact, lo = _levels_general(comm, u, valid, entmax_beta(alpha), settings)
    else:
        tau_u, exact, lo = _levels_integer(comm, u, valid, beta, settings)
    tau_u = torch.where(anything, tau_u, float("inf"))
    tau_u = torch.where(poisoned, float("nan"), tau_u)
    exact = exact & ~poisoned
    lower_u = torch.where(exact | ~anything | poisoned, tau_u, lo)
    base = shift * (alpha - 1.0)
    return GlobalThreshold(u, valid, tau_u, base + tau_u, exact, base + lower_u)


def combine_output(comm: Collectives, solved: GlobalThreshold, v: torch.Tensor, alpha: float,
                   extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact entmax attention output from the local scores and the global threshold.

    ``solved`` holds rows ``[B, Hkv, G, C]`` (the query group of each KV head), ``v [B, Hkv, C, D]``
    the local values. Each rank forms ``sum p v`` and ``sum p`` over its tokens and one
    ``all_reduce(SUM)`` adds them (``extra [B, Hkv, G, E]``, optional, rides along and comes back
    summed). A V row enters only where some head of its group has ``p > 0``, so garbage in
    unattended rows cannot leak through ``0 * NaN``. Returns ``(out [B, Hkv, G, D], extra)``: 0 for
    a head with nothing attended, NaN for a poisoned one.
    """
    beta = entmax_beta(alpha)
    gap = torch.where(solved.valid, torch.clamp(solved.u - solved.tau_u[..., None], min=0.0), 0.0)
    gap = torch.where(torch.isnan(solved.tau_u)[..., None], float("nan"), gap)
    p = gap if beta == 1.0 else gap * gap if beta == 2.0 else gap.pow(beta)
    live = (p > 0).any(2)
    values = torch.where(live[..., None], v.to(p.dtype), 0.0)
    return sum_and_normalize(comm, p @ values, p.sum(-1, keepdim=True), extra)


def sum_and_normalize(comm: Collectives, num: torch.Tensor, den: torch.Tensor,
                      extra: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum num / sum den, sum extra)`` over the ranks, from one ``all_reduce(SUM)`` of the three
    packed together (``num [..., D]``, ``den [..., 1]``, ``extra [..., E]`` or None); 0 where the
    summed ``den`` is 0."""
    parts = [num, den] + ([extra.to(num.dtype)] if extra is not None else [])
    packed = comm.sum_(torch.cat(parts, -1))
    head_dim = num.shape[-1]
    num, den = packed[..., :head_dim], packed[..., head_dim:head_dim + 1]
    out = num / torch.where(den > 0, den, 1.0)
    return out, (packed[..., head_dim + 1:] if extra is not None else None)


def _edges(lo: torch.Tensor, hi: torch.Tensor, count: int) -> torch.Tensor:
    """``count + 1`` equally spaced points from ``lo`` to ``hi`` (both exact) ``[..., count+1]``."""
    steps = torch.arange(count + 1, dtype=lo.dtype, device=lo.device) / count
    edges = lo[..., None] + (hi - lo)[..., None] * steps
    edges[..., 0], edges[..., -1] = lo, hi
    return edges


def _levels_integer(comm: Collectives, u: torch.Tensor, valid: torch.Tensor, beta: int,
                    settings: TauSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tau_u, exact, lo)`` for integer beta: bin levels, then the gather finish (``lo`` the
    final bracket's lower end, a proven lower bound)."""
    lead = u.shape[:-1]
    lo = torch.full(lead, -1.0, dtype=u.dtype, device=u.device)
    hi = torch.zeros_like(lo)
    for _ in range(settings.levels):
        edges = _edges(lo, hi, settings.bins)
        sums = comm.sum_(_bin_power_sums(u, valid, edges, beta))
        above = _power_sums_at_edges(sums, edges, beta)  # [..., bins+1, beta+1]
        f = above[..., :-1, beta]  # f(e_k) for k < bins
        k = ((f >= 1.0).sum(-1) - 1).clamp(0, settings.bins - 1)
        lo, hi = edges.gather(-1, k[..., None])[..., 0], edges.gather(-1, (k + 1)[..., None])[..., 0]
        moments_above = above.gather(-2, (k + 1)[..., None, None].expand(*lead, 1, beta + 1))[..., 0, :]
        inside = sums[..., 0].gather(-1, k[..., None])[..., 0]
    gathered = _gather_bracket(comm, u, valid, lo, hi, settings.gather_cap)
    wide = torch.float64
    tau_u = _finish_integer(moments_above, lo.to(wide), hi.to(wide), gathered.to(wide), beta)
    return tau_u.to(u.dtype), inside <= settings.gather_cap, lo


def _bin_power_sums(u: torch.Tensor, valid: torch.Tensor, edges: torch.Tensor, beta: int) -> torch.Tensor:
    """float64 ``[..., bins+1, beta+1]``: per bin ``j`` (``(e_j, e_{j+1}]``; the last one is
    ``u > hi``) the sums ``sum (u - e_j)^r``, ``r = 0..beta``, of this rank's scores above ``lo``."""
    bins = edges.shape[-1] - 1
    index = torch.searchsorted(edges.contiguous(), u.contiguous())  # first edge >= u
    candidate = valid & (index > 0)
    bin_of = (index - 1).clamp(0, bins)
    origin = edges.gather(-1, bin_of)
    d = torch.where(candidate, (u - origin).clamp(min=0.0), 0.0).to(torch.float64)
    # The scores below the bracket (most of them) add zeros; spreading them over spare slots
    # instead of one bin keeps a GPU's atomic adds from all hitting one address.
    spare = bins + 1 + torch.arange(u.shape[-1], device=u.device) % _SPARE_SLOTS
    slot = torch.where(candidate, bin_of, spare)
    sums = torch.zeros(*u.shape[:-1], bins + 1 + _SPARE_SLOTS, beta + 1, dtype=torch.float64, device=u.device)
    power = candidate.to(torch.float64)
    for r in range(beta + 1):
        sums[..., r].scatter_add_(-1, slot, power)
        power = power * d
    return sums[..., :bins + 1, :].contiguous()


def _power_sums_at_edges(sums: torch.Tensor, edges: torch.Tensor, beta: int) -> torch.Tensor:
    """``[..., bins+1, beta+1]``: at every edge ``e_k`` the power sums ``sum_{u > e_k} (u - e_k)^r``
    from the bins' sums about their own lower edges (binomial expansion; positive terms)."""
    e = edges.to(torch.float64)
    shift = (e[..., None, :] - e[..., :, None]).clamp(min=0.0)  # [..., k, j] = e_j - e_k
    upper = torch.ones(shift.shape[-2:], dtype=torch.bool, device=e.device).triu()  # j >= k
    powers = [torch.where(upper, 1.0, 0.0).to(shift.dtype)]
    for _ in range(beta):
        powers.append(powers[-1] * shift)
    out = []
    for r in range(beta + 1):
        total = sum(math.comb(r, m) * (powers[r - m] * sums[..., None, :, m]).sum(-1) for m in range(r + 1))
        out.append(total)
    return torch.stack(out, -1)


def _gather_bracket(comm: Collectives, u: torch.Tensor, valid: torch.Tensor, lo: torch.Tensor,
                    hi: torch.Tensor, cap: int) -> torch.Tensor:
    """``[..., W*cap]``, sorted descending: up to ``cap`` of each rank's scores in ``(lo, hi]``
    (the largest), ``-inf`` padded, from one ``all_gather``."""
    inside = valid & (u > lo[..., None]) & (u <= hi[..., None])
    scores = torch.where(inside, u, float("-inf"))
    take = min(cap, scores.shape[-1])
    top = scores.topk(take, dim=-1).values
    if take < cap:
        top = torch.nn.functional.pad(top, (0, cap - take), value=float("-inf"))
    everyone = comm.gather(top)  # [W, ..., cap]
    merged = everyone.movedim(0, -2).flatten(-2)
    return merged.sort(dim=-1, descending=True).values


def _finish_integer(moments: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, gathered: torch.Tensor,
                    beta: int) -> torch.Tensor:
    """The root of ``f(t) = 1`` in ``[lo, hi)``, ``f(t) = sum_r C(beta,r) m_r (hi - t)^(beta-r) +
    sum_i [g_i - t]_+^beta`` (``m`` the power sums above ``hi`` about ``hi``, ``g`` the gathered
    in-bracket scores, sorted descending)."""

    def f_and_slope(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = (hi - t).clamp(min=0.0)
        f = sum(math.comb(beta, r) * moments[..., r] * h ** (beta - r) for r in range(beta + 1))
        slope = sum(math.comb(beta - 1, r) * moments[..., r] * h ** (beta - 1 - r) for r in range(beta))
        gap = (gathered - t[..., None]).clamp(min=0.0)
        f = f + (gap ** beta).sum(-1)
        slope = slope + (gap ** (beta - 1) * (gap > 0)).sum(-1)
        return f, -beta * slope

    # f at each gathered score: f(g_i) < 1 exactly for the gathered part of the support (a prefix)
    h = (hi[..., None] - gathered).clamp(min=0.0)
    at_g = sum(math.comb(beta, r) * moments[..., r, None] * h ** (beta - r) for r in range(beta + 1))
    at_g = at_g + ((gathered[..., None, :] - gathered[..., :, None]).clamp(min=0.0) ** beta).sum(-1)
    in_support = (at_g < 1.0) & torch.isfinite(gathered)
    count = in_support.sum(-1, keepdim=True)
    first_out = torch.cat([gathered, torch.full_like(gathered[..., :1], float("-inf"))], -1).gather(-1, count)[..., 0]
    t = torch.maximum(first_out, lo)  # f(t) >= 1 here: the iteration climbs to the root from the left
    for _ in range(_NEWTON_STEPS):
        f, slope = f_and_slope(t)
        step = (f - 1.0) / torch.where(slope < 0, slope, -1.0)
        t = torch.where(f > 1.0, t - step, t)
    return torch.minimum(torch.maximum(t, lo), hi)


def _levels_general(comm: Collectives, u: torch.Tensor, valid: torch.Tensor, beta: float,
                    settings: TauSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tau_u, exact, lo)`` for non-integer beta: pivot levels down to a few ulps, the midpoint."""
    lead = u.shape[:-1]
    lo = torch.full(lead, -1.0, dtype=u.dtype, device=u.device)
    hi = torch.zeros_like(lo)
    resolution = 4.0 * torch.finfo(u.dtype).eps
    levels = math.ceil(math.log(1.0 / resolution) / math.log(settings.pivots))
    for _ in range(levels):
        points = _edges(lo, hi, settings.pivots)
        interior = points[..., 1:-1]
        f = torch.zeros(interior.shape, dtype=torch.float64, device=u.device)
        for start in range(0, interior.shape[-1], 8):  # bounded memory: 8 pivots x C at a time
            t = interior[..., start:start + 8]
            gap = torch.where(valid[..., None, :], (u[..., None, :] - t[..., :, None]).clamp(min=0.0), 0.0)
            f[..., start:start + 8] = gap.to(torch.float64).pow(beta).sum(-1)
        comm.sum_(f)
        k = (f >= 1.0).sum(-1)  # points[k] has f >= 1 (point 0 = lo always does), points[k+1] < 1
        lo, hi = points.gather(-1, k[..., None])[..., 0], points.gather(-1, (k + 1)[..., None])[..., 0]
    return 0.5 * (lo + hi), (hi - lo) <= resolution, lo
