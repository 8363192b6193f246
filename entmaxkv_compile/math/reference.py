"""Exact row-wise alpha-entmax in pure torch: the CPU path, the test oracle, the ONNX decomposition.

alpha-entmax maps scores ``x`` to ``p_i = [z_i - tau]_+ ** beta`` with ``z = (alpha-1) * x``,
``beta = 1/(alpha-1)`` and ``tau`` the unique threshold with ``sum_i p_i = 1``. alpha = 2 is
sparsemax, alpha = 1.5 is entmax15; alpha -> 1 recovers softmax.

How ``tau`` is found:

- alpha = 2 and alpha = 1.5: exactly, by sorting (the support is a prefix of the sorted scores and
  ``tau`` has a closed form for each prefix length);
- any other alpha > 1: a bracketed Newton iteration on ``f(tau) = sum [z - tau]_+^beta - 1`` inside
  ``[max z - 1, max z - n^(1-alpha)]`` (``f`` changes sign there). A Newton step that leaves the
  bracket is replaced by bisection, so every iteration at least halves the bracket; after
  ``_GENERAL_ITERS`` = 64 iterations the bracket (width <= 1) is below the dtype's resolution. The
  result is then normalised, so rows sum to 1 to rounding and zeros are exact.

Shift invariance: entmax(x + c) = entmax(x). Every solve works on ``u = (alpha-1) (x - max x)``
(the row max over the attended entries), so ``u <= 0`` with its largest entry exactly 0 whatever
the offset ``c``: a float32 row of scores ``x*0.1 + 1e4`` is solved as accurately as ``x*0.1``.
``tau`` is reported as ``(alpha-1) max x + tau_u`` and probabilities use ``u - tau_u``.

Edge inputs (docs/EDGE_INPUTS.md):

- entries excluded by ``mask`` (bool, True = attended) are ignored whatever their value, NaN
  included; ``-inf`` entries are attended with probability exactly 0 (the additive-mask
  convention);
- a row whose attended entries hold a NaN or a ``+inf`` gets NaN probabilities and ``tau = NaN``
  (a ``+inf`` score is an overflow, and several of them have no unique limit; this is also what
  ``torch.softmax`` does), on every path of the package;
- a row with no attended finite entry gets all zeros and ``tau = +inf``.

Half-precision inputs are computed in float32 and returned in their own dtype; ``tau`` is returned
in the compute dtype (float32 or float64).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import check_alpha

__all__ = ["entmax", "entmax_threshold", "entmax_probs", "entmax_probs_and_threshold"]

_GENERAL_ITERS = 64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def entmax_beta(alpha: float) -> float:
    """beta = 1/(alpha-1), snapped to the nearest integer when within 1e-9 (exact fast powers)."""
    beta = 1.0 / (alpha - 1.0)
    return float(round(beta)) if abs(beta - round(beta)) < 1e-9 else beta


def _check_row_args(x: Any, dim: Any, mask: Any) -> None:
    """``x`` a floating tensor of at least one dimension, ``dim`` an int axis of it, ``mask`` None or
    a bool tensor on x's device broadcastable to ``x.shape``; errors name the argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (entmax normalises along dim), got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
    if x.shape[dim] == 0:
        raise ValueError(f"x must have at least one entry along dim={dim}, got shape {tuple(x.shape)}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.device != x.device:
        raise ValueError(f"mask must be on x's device {x.device}, got {mask.device}")
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} must broadcast to x's shape {tuple(x.shape)}")


def _shifted_scores(
    x: torch.Tensor, alpha: float, dim: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores relative to the row max, on the last axis, in the compute dtype.

    Returns ``(u, valid, zmax, poisoned)``: ``u = (alpha-1)(x - max x)`` (``-inf`` where not
    valid), ``valid`` the attended finite-or-``-inf`` entries with ``u > -inf``, ``zmax [..., 1] =
    (alpha-1) max x`` (0 for rows with nothing valid) and ``poisoned [...]``, rows whose attended
    entries hold a NaN or ``+inf``.
    """
    xc = x.to(_compute_dtype(x.dtype)).movedim(dim, -1)
    attended = torch.ones_like(xc, dtype=torch.bool)
    if mask is not None:
        attended = torch.broadcast_to(mask, x.shape).movedim(dim, -1)
    poisoned = (attended & (torch.isnan(xc) | (xc == float("inf")))).any(-1)
    valid = attended & torch.isfinite(xc)
    xmax = torch.where(valid, xc, float("-inf")).amax(-1, keepdim=True)
    xmax = torch.where(torch.isfinite(xmax), xmax, 0.0)
    u = torch.where(valid, (xc - xmax) * (alpha - 1.0), float("-inf"))
    valid = valid & (u != float("-inf"))
    return u, valid, xmax * (alpha - 1.0), poisoned


def _tau_sorted(z: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact tau for alpha in {1.5, 2}: the support is a prefix of the sorted valid scores."""
    zs, _ = torch.where(valid, z, float("-inf")).sort(dim=-1, descending=True)
    is_valid = zs != float("-inf")
    zs0 = torch.where(is_valid, zs, 0.0)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    csum = zs0.cumsum(-1)
    if alpha == 2.0:
        tau_k = (csum - 1.0) / k
    else:  # alpha == 1.5: sum (z - tau)^2 = 1 over the top k
        mean = csum / k
        mean_sq = (zs0 * zs0).cumsum(-1) / k
        ss = k * (mean_sq - mean * mean)
        tau_k = mean - torch.sqrt(torch.clamp((1.0 - ss) / k, min=0.0))
    # The support is a prefix of the sorted scores; counting it as one (cumprod) also keeps
    # overflowed prefix sums (e.g. additive masks of finfo.min) from being counted in.
    in_support = (tau_k <= zs) & is_valid
    support = in_support.cumprod(-1).sum(-1, keepdim=True)
    tau = tau_k.gather(-1, (support - 1).clamp(min=0)).squeeze(-1)
    return torch.where(support.squeeze(-1) > 0, tau, float("inf"))


def _tau_bracketed(z: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """tau for general alpha by bracketed Newton (bisection fallback), fixed iteration count."""
    beta = entmax_beta(alpha)
    zv = torch.where(valid, z, float("-inf"))
    zmax = zv.max(dim=-1, keepdim=True).values
    n = valid.sum(-1, keepdim=True).to(z.dtype)
    lo = zmax - 1.0
    hi = zmax - n.clamp(min=1.0).pow(1.0 - alpha)
    tau = lo.clone()
    for _ in range(_GENERAL_ITERS):
        gap = torch.clamp(zv - tau, min=0.0)
        f = gap.pow(beta).sum(-1, keepdim=True) - 1.0
        df = -beta * gap.pow(beta - 1.0).where(gap > 0, 0.0).sum(-1, keepdim=True)
        lo = torch.where(f > 0, tau, lo)
        hi = torch.where(f > 0, hi, tau)
        newton = tau - f / torch.where(df < 0, df, -1.0)
        ok = (df < 0) & (newton > lo) & (newton < hi)
        tau = torch.where(ok, newton, 0.5 * (lo + hi))
    tau = tau.squeeze(-1)
    return torch.where(n.squeeze(-1) > 0, tau, float("inf"))


def _solve(
    x: torch.Tensor, alpha: float, dim: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, shift and solve: ``(u, valid, tau_u [...], zmax [...], poisoned [...])`` with the
    threshold of ``x`` equal to ``zmax + tau_u`` (``tau_u`` NaN on poisoned rows)."""
    _check_row_args(x, dim, mask)
    u, valid, zmax, poisoned = _shifted_scores(x, alpha, dim, mask)
    solve = _tau_sorted if alpha in (1.5, 2.0) else _tau_bracketed
    tau_u = torch.where(poisoned, float("nan"), solve(u, valid, alpha))
    return u, valid, tau_u, zmax.squeeze(-1), poisoned


def entmax_threshold(
    x: torch.Tensor, alpha: float = 1.5, dim: int = -1, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The threshold ``tau`` with ``entmax(x) = [(alpha-1) x - tau]_+ ** (1/(alpha-1))``.

    Args:
        x: scores, any floating dtype, at least one dimension.
        alpha: entmax alpha (>= 1.01, see ``config.MIN_ALPHA``).
        dim: the axis entmax normalises over; it is reduced away in the result.
        mask: optional bool mask broadcastable to ``x``; False entries are excluded.

    Returns:
        ``tau`` with ``dim`` removed, in float32 (float64 for float64 input); NaN on rows whose
        attended entries hold a NaN or ``+inf``, ``+inf`` on rows with nothing to attend.
    """
    alpha = check_alpha(alpha)
    _, _, tau_u, zmax, _ = _solve(x, alpha, dim, mask)
    return zmax + tau_u


def entmax_probs_and_threshold(
    x: torch.Tensor, alpha: float = 1.5, dim: int = -1, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, tau)`` from one solve: :func:`entmax_probs` and :func:`entmax_threshold` of ``x``.

    ``p`` is computed from the shifted scores ``u - tau_u``, never from ``(alpha-1) x - tau``,
    which would cancel catastrophically when the scores share a large offset.
    """
    alpha = check_alpha(alpha)
    u, valid, tau_u, zmax, poisoned = _solve(x, alpha, dim, mask)
    gap = torch.where(valid, torch.clamp(u - tau_u.unsqueeze(-1), min=0.0), 0.0)
    beta = entmax_beta(alpha)
    p = gap if beta == 1.0 else gap * gap if beta == 2.0 else gap.pow(beta)
    total = p.sum(-1, keepdim=True)
    p = p / torch.where(total > 0, total, 1.0)
    p = torch.where(poisoned.unsqueeze(-1), float("nan"), p)
    return p.movedim(-1, dim), zmax + tau_u


def entmax_probs(
    x: torch.Tensor, alpha: float = 1.5, dim: int = -1, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward entmax without autograd bookkeeping, in the compute dtype (see :func:`entmax`)."""
    return entmax_probs_and_threshold(x, alpha, dim, mask)[0]


class _EntmaxFunction(torch.autograd.Function):
    """Autograd for entmax: with ``u = p^(2-alpha)`` on the support, ``dx = u*dy - u*(u.dy)/sum u``."""

    @staticmethod
    def forward(ctx, x, alpha, dim, mask):  # type: ignore[override]
        p = entmax_probs(x, alpha, dim, mask)
        ctx.save_for_backward(p)
        ctx.alpha, ctx.dim = alpha, dim
        return p.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        alpha, dim = ctx.alpha, ctx.dim
        u = torch.where(p > 0, p.pow(2.0 - alpha), 0.0)
        dy = dy.to(p.dtype)
        coef = (u * dy).sum(dim, keepdim=True) / u.sum(dim, keepdim=True).clamp(min=1e-30)
        dx = u * dy - coef * u
        return dx, None, None, None


def entmax(
    x: torch.Tensor, alpha: float = 1.5, dim: int = -1, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """alpha-entmax of ``x`` along ``dim``: rows sum to 1 and contain exact zeros.

    Differentiable in ``x``. ``alpha`` = 1.5 and 2 are exact (sort-based); other alpha >= 1.01 use
    a bracketed Newton solve accurate to the dtype's resolution (see the module docstring). The
    solve is shift-invariant (it works relative to the row max); rows whose attended entries hold
    a NaN or ``+inf`` come out NaN (docs/EDGE_INPUTS.md).

    >>> entmax(torch.tensor([3.0, 1.0, -2.0]), alpha=2.0)
    tensor([1., 0., 0.])
    """
    alpha = check_alpha(alpha)
    _check_row_args(x, dim, mask)
    return _EntmaxFunction.apply(x, alpha, dim, mask)

