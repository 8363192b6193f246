"""Synthetic and recorded decode caches: q, K, V for the decode benchmark.

Speed claims must not hinge on one key generator, so the benchmark times every method on several
families of caches. Each generator is ``(B, Hq, Hkv, N, D, dtype, device, seed) -> (q, K, V)``
with ``q [B, Hq, 1, D]`` and ``K, V [B, Hkv, N, D]`` (contiguous, in ``dtype``, on ``device``).
Query head ``h`` reads KV head ``h // (Hq // Hkv)``; the decoding token sits at position ``N - 1``.

Tensors are generated on ``device`` in chunks of :data:`CHUNK` tokens, each chunk from its own
seeded generator, so a 1M-token cache at B = 8 never passes through host memory and the result
is a function of (seed, chunk index) only: deterministic per seed on a given device type (CPU and
CUDA random streams differ).

Families (``FAMILIES``):

- ``iid``: q, K, V iid standard normal. Scores are Gaussian, so the entmax support is a thin upper
  tail scattered over all pages: the worst case for page sparsity.
- ``planted0.5`` / ``planted2`` / ``planted8``: iid noise keys, plus 16 spans of consecutive pages
  (0.5 / 2 / 8 % of the pages in all, laid out independently per sequence and KV head) whose keys
  are shifted along the query group's mean direction by 4.5-7.5 score units (noise scores have unit
  scale): the relevant context is a few retrieved passages.
- ``heavy``: keys from a multivariate Student-t with 3 degrees of freedom (a Gaussian vector times
  one per-token scale ``sqrt((nu - 2) / chi2_nu)``): a few outlier tokens with huge norms, the
  heavy-tailed scores real caches show.
- ``lowrank_rope``: keys of rank 8 (plus 5% noise) per KV head, queries in the same subspace, then
  rotary position embedding (gpt-fast's interleaved pairs, base 10000) applied to the keys at their
  positions and to the queries at ``N - 1``: the relative-position structure of RoPE models.
- ``real``: activations recorded from the trained entmax twin of ``examples/tiny_lm``, tiled to
  ``N`` tokens; see :mod:`benchmarks.real_activations` for what that is and how far it is from a
  real long-context model.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Callable

import torch

from benchmarks.seeding import CHUNK, _gen

__all__ = ["CHUNK", "FAMILIES", "generate", "planted_page_mask", "rope"]  # CHUNK from seeding.py

PAGE = 16  # the page size the planted spans are laid out in (the benchmark's page size)

Generator = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def _normal_cache(b: int, h: int, n: int, d: int, dtype, device, seed: int, tag: str) -> torch.Tensor:
    """``[b, h, n, d]`` standard normal in ``dtype``, generated chunk by chunk on ``device``."""
    out = torch.empty(b, h, n, d, dtype=dtype, device=device)
    for index, (start, stop) in enumerate(_chunks(n)):
        g = _gen(device, seed, tag, index)
        out[:, :, start:stop] = torch.randn(b, h, stop - start, d, generator=g, device=device, dtype=dtype)
    return out


def _check(b: int, hq: int, hkv: int, n: int, d: int) -> None:
    for name, value in (("B", b), ("Hq", hq), ("Hkv", hkv), ("N", n), ("D", d)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hq % hkv:
        raise ValueError(f"Hq must be a multiple of Hkv, got Hq={hq}, Hkv={hkv}")
    if d % 2:
        raise ValueError(f"D must be even (RoPE pairs), got {d}")


def iid(b, hq, hkv, n, d, dtype, device, seed=0):
    """q, K, V iid standard normal (the worst case for page sparsity)."""
    _check(b, hq, hkv, n, d)
    q = torch.randn(b, hq, 1, d, generator=_gen(device, seed, "q"), device=device).to(dtype)
    k = _normal_cache(b, hkv, n, d, dtype, device, seed, "k")
    return q, k, _normal_cache(b, hkv, n, d, dtype, device, seed, "v")


def planted_page_mask(b: int, hkv: int, pages: int, density: float, spans: int, seed: int,
                      device) -> torch.Tensor:
    """bool ``[b, hkv, pages]``: ``spans`` runs of consecutive pages, ``round(density * pages)``
    pages in all (at least one), one run at a random offset inside each of ``spans`` equal segments
    of the page range, drawn independently per sequence and KV head."""
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must lie in (0, 1), got {density}")
    planted = max(1, round(density * pages))
    spans = max(1, min(spans, planted))
    lengths = torch.full((spans,), planted // spans, dtype=torch.int64)
    lengths[: planted % spans] += 1
    seg = pages / spans
    seg_start = torch.floor(torch.arange(spans, dtype=torch.float64) * seg).to(torch.int64)
    seg_len = torch.floor(torch.arange(1, spans + 1, dtype=torch.float64) * seg).to(torch.int64) - seg_start
    room = (seg_len - lengths).clamp(min=0)  # free offsets inside each segment
    g = torch.Generator().manual_seed(zlib.crc32(f"spans/{seed}".encode()))
    offsets = (torch.rand(b, hkv, spans, generator=g, dtype=torch.float64) * (room + 1)).floor().to(torch.int64)
    starts = seg_start + offsets  # [b, hkv, spans]
    page = torch.arange(pages)
    inside = (page >= starts[..., None]) & (page < (starts + lengths)[..., None])  # [b, hkv, spans, pages]
    return inside.any(2).to(device)


def planted(b, hq, hkv, n, d, dtype, device, seed=0, *, density=0.02, spans=16, shift=6.0,
            direction: torch.Tensor | None = None, scale: float | None = None):
    """iid keys with planted spans of keys aligned with the query group (see the module doc).

    Queries: a base vector per (sequence, KV head) plus 0.3 x noise per query head. A planted key
    gets ``s * u`` with ``u = m / (|m|^2 * scale)`` (``m`` the group's mean query, ``scale``
    default ``1/sqrt(D)``), so its score rises by ``s`` ~ ``shift`` x U[0.75, 1.25] for a query
    equal to ``m``. ``direction [B, Hkv, D]`` replaces ``m`` (e.g. a model's own queries).
    """
    _check(b, hq, hkv, n, d)
    g = _gen(device, seed, "q")
    group = hq // hkv
    base = torch.randn(b, hkv, 1, d, generator=g, device=device)
    q = (base + 0.3 * torch.randn(b, hkv, group, d, generator=g, device=device)).reshape(b, hq, 1, d)
    mean = q.reshape(b, hkv, group, d).mean(2) if direction is None else direction.float().to(device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    u = mean / ((mean * mean).sum(-1, keepdim=True) * scale)  # [b, hkv, d]
    mask = planted_page_mask(b, hkv, -(-n // PAGE), density, spans, seed, device)
    k = _normal_cache(b, hkv, n, d, dtype, device, seed, "k")
    for index, (start, stop) in enumerate(_chunks(n)):
        rows = torch.arange(start, stop, device=device) // PAGE
        hit = mask[:, :, rows]  # [b, hkv, c]
        s = shift * (0.75 + 0.5 * torch.rand(b, hkv, stop - start, generator=_gen(device, seed, "s", index),
                                             device=device))
        k[:, :, start:stop] += (torch.where(hit, s, 0.0)[..., None] * u[:, :, None, :]).to(dtype)
    return q.to(dtype), k, _normal_cache(b, hkv, n, d, dtype, device, seed, "v")


def heavy(b, hq, hkv, n, d, dtype, device, seed=0, *, nu: int = 3):
    """Gaussian queries; keys ``g * sqrt((nu - 2) / w)``, ``g ~ N(0, I_D)``, ``w ~ chi2_nu`` per
    token (multivariate Student-t with unit coordinate variance: heavy-tailed token norms)."""
    _check(b, hq, hkv, n, d)
    if not isinstance(nu, int) or nu < 3:
        raise ValueError(f"nu must be an int >= 3 (finite variance), got {nu!r}")
    q = torch.randn(b, hq, 1, d, generator=_gen(device, seed, "q"), device=device).to(dtype)
    k = torch.empty(b, hkv, n, d, dtype=dtype, device=device)
    for index, (start, stop) in enumerate(_chunks(n)):
        g = _gen(device, seed, "k", index)
        c = stop - start
        w = torch.randn(b, hkv, c, nu, generator=g, device=device).square().sum(-1, keepdim=True)
        k[:, :, start:stop] = (torch.randn(b, hkv, c, d, generator=g, device=device)
                               * torch.sqrt((nu - 2) / w)).to(dtype)
    return q, k, _normal_cache(b, hkv, n, d, dtype, device, seed, "v")


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x [..., T, D]`` by ``positions[t] *
    base^(-2i/D)`` (gpt-fast's convention); angles in float64, result in x's dtype. Negative
    positions undo the rotation."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = angles.cos().float(), angles.sin().float()
    xs = x.float().reshape(*x.shape[:-1], d // 2, 2)
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.flatten(-2).to(x.dtype)


def lowrank_rope(b, hq, hkv, n, d, dtype, device, seed=0, *, rank: int = 8, noise: float = 0.05,
                 q_gain: float = 0.5):
    """Rank-``rank`` keys ``A c_t + noise`` per KV head (``A`` entries N(0, 1/rank), so unit
    coordinate variance), queries ``q_gain * A c_q`` per query head, then RoPE by position."""
    _check(b, hq, hkv, n, d)
    g = _gen(device, seed, "basis")
    basis = torch.randn(b, hkv, d, rank, generator=g, device=device) / math.sqrt(rank)
    group = hq // hkv
    cq = torch.randn(b, hkv, rank, group, generator=g, device=device)
    q = q_gain * (basis @ cq).transpose(-1, -2).reshape(b, hq, 1, d)
    q = rope(q, torch.tensor([n - 1], device=device))
    k = torch.empty(b, hkv, n, d, dtype=dtype, device=device)
    for index, (start, stop) in enumerate(_chunks(n)):
        gk = _gen(device, seed, "k", index)
        c = torch.randn(b, hkv, rank, stop - start, generator=gk, device=device)
        pre = (basis @ c).transpose(-1, -2) + noise * torch.randn(b, hkv, stop - start, d, generator=gk,
                                                                  device=device)
        k[:, :, start:stop] = rope(pre, torch.arange(start, stop, device=device)).to(dtype)
    return q.to(dtype), k, _normal_cache(b, hkv, n, d, dtype, device, seed, "v")


def real(b, hq, hkv, n, d, dtype, device, seed=0):
    """Activations of the trained tiny_lm entmax twin; see :func:`benchmarks.real_activations.real`."""
    from benchmarks.real_activations import real as _real

    _check(b, hq, hkv, n, d)
    return _real(b, hq, hkv, n, d, dtype, device, seed)


FAMILIES: dict[str, Generator] = {
    "iid": iid,
    "planted0.5": functools.partial(planted, density=0.005),
    "planted2": functools.partial(planted, density=0.02),
    "planted8": functools.partial(planted, density=0.08),
    "heavy": heavy,
    "lowrank_rope": lowrank_rope,
    "real": real,
}


def generate(family: str, b: int, hq: int, hkv: int, n: int, d: int, dtype: torch.dtype,
             device: torch.device | str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, K, V)`` of the named family (a key of :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    with torch.no_grad():
        return FAMILIES[family](b, hq, hkv, n, d, dtype, device, seed)
