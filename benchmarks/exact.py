"""Exact full alpha-entmax decode in plain torch: the oracle every timed method is compared with.

Independent of the package's own reference (no sort, nothing imported from it): the scores of all
N tokens are computed in float32 chunk by chunk (no ``[Hq, N, D]`` copy), the threshold is
bracketed by bisection in float32 and then made exact on the bracketed support in float64 (closed
form for alpha = 1.5 and 2, a few Newton steps otherwise), and ``p @ V`` is accumulated in float32
chunk by chunk. 1M tokens at B = 8, Hq = 32 need the float32 scores (1 GiB) and one K/V chunk.
"""

from __future__ import annotations

import math

import torch

__all__ = ["exact_entmax_decode"]

_BISECT = 48


def _support_tau(z: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """The threshold solved exactly (float64) on the support ``z > tau`` of the current guess."""
    zd = z.double()
    support = zd > tau[..., None]
    if alpha in (1.5, 2.0):  # sum (z - t)^2 = 1, or sum (z - t) = 1: closed forms on a fixed support
        n = support.sum(-1).double()
        s1 = torch.where(support, zd, 0.0).sum(-1)
        if alpha == 2.0:
            return (s1 - 1.0) / n
        s2 = torch.where(support, zd * zd, 0.0).sum(-1)
        disc = (s1 * s1 - n * (s2 - 1.0)).clamp(min=0.0)
        return (s1 - disc.sqrt()) / n
    beta = 1.0 / (alpha - 1.0)
    t = tau.clone()
    for _ in range(8):  # Newton on f(t) = sum [z - t]_+^beta - 1 from a point left of the root
        gap = (zd - t[..., None]).clamp(min=0.0)
        f = gap.pow(beta).sum(-1) - 1.0
        df = -beta * gap.pow(beta - 1.0).sum(-1)
        t = t - f / df
    return t


def entmax_weights(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact alpha-entmax over the last axis of float32 ``scores`` (finite), in float32."""
    z = scores * (alpha - 1.0)
    zmax = z.amax(-1)
    n = z.shape[-1]
    lo, hi = zmax - 1.0, zmax - n ** (1.0 - alpha)  # f(lo) >= 0 >= f(hi)
    beta = 1.0 / (alpha - 1.0)
    for _ in range(_BISECT):
        mid = 0.5 * (lo + hi)
        mass = (z - mid[..., None]).clamp(min=0.0).pow(beta).sum(-1)
        above = mass >= 1.0
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    tau = lo.double()
    for _ in range(3):  # the support of the bracket, then of the refined tau (fixed point)
        tau = _support_tau(z, tau, alpha)
    p = (z.double() - tau[..., None]).clamp(min=0.0).pow(beta)
    return (p / p.sum(-1, keepdim=True)).float()


@torch.no_grad()
def exact_entmax_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float = 1.5,
                        scale: float | None = None, chunk: int = 1 << 16) -> torch.Tensor:
    """``entmax_alpha(q K^T * scale) V`` over all N tokens: float32 ``[B, Hq, 1, D]``.

    ``q [B, Hq, 1, D]``, ``k, v [B, Hkv, N, D]`` (GQA: query head h reads KV head h // G).
    """
    if q.dim() != 4 or q.shape[2] != 1 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, Hq, 1, D] and k, v [B, Hkv, N, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, hq, _, dim = q.shape
    hkv, n = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    qg = q.float().reshape(batch, hkv, group, dim)
    scores = torch.empty(batch, hkv, group, n, device=q.device)
    for s in range(0, n, chunk):
        scores[..., s:s + chunk] = (qg @ k[:, :, s:s + chunk].float().transpose(-1, -2)) * scale
    p = entmax_weights(scores, alpha)
    del scores
    out = torch.zeros(batch, hkv, group, dim, device=q.device)
    for s in range(0, n, chunk):
        out += p[..., s:s + chunk] @ v[:, :, s:s + chunk].float()
    return out.reshape(batch, hq, 1, dim)
