"""The tier-2 key sketch of the certificate: a per-token int8 copy of K and its page upper bounds.

Per token and KV head, K is cut into groups of 32 channels (the last group is shorter when D is
not a multiple of 32) and each group is stored as int8 codes ``c_d = round(k_d / s_g)`` in
``[-127, 127]`` with one absmax scale ``s_g >= max_{d in g} |k_d| / 127``. Rounding to the
nearest level errs by at most half a step per channel, so for any query

    q.k  <=  sum_g s_g (q_g . c_g + (1/2) sum_{d in g} |q_d|)

is a valid upper bound of every token's score, and the same sum with the half steps subtracted a
valid lower bound. The threshold of the lower bounds over every token is a floor of the full
entmax threshold (``sketch_tau_floor``: the threshold is non-decreasing in every score), so the
certified step can select the pages whose upper bound exceeds it without any estimate. Its slack is about 0.06 score standard deviations
on the measured data families, small enough to clear ~98-100% of the pages that hold no entmax
support (benchmarks/QUALITY.md, "Bound margins"), where page-level box or ball bounds clear none.

**Scales are bfloat16, rounded up.** Two bytes per group (136 B per token and KV head at D = 128,
53% of an fp16 K row) like fp16, but with float32's exponent range, so no finite key can overflow
its scale (an fp16 scale would overflow for fp32 keys beyond 8.3e6) and none of tiny keys
flushes to 0. The float32 ``absmax / 127`` is bumped one ulp and then rounded *up* to bfloat16
by bit arithmetic, so the stored scale is never below ``absmax / 127``: codes stay within
``[-127, 127]`` and the half-step error bound holds for the stored scale. Rounding up widens
the step by less than 2^-7 (0.8%) of an already small error term.

**Rounding of the bound.** Everything is computed in float32 in a fixed form that the Triton
kernel repeats: ``U = sum_g s_g (dot_g + h qabs_g)``, ``ub = scale U + bias`` with ``h = 1/2 +
2^-16`` (the half step plus the float32 rounding of ``k_d / s_g``, of a float64 key and of the
``+ 1/2`` of the rounding rule). Each score is a nest of at most ``D + G + 8`` float32 roundings
over terms bounded in magnitude by ``A = 128 scale sum_g s_g qabs_g`` plus ``|bias|``, whatever
the summation order, so the float32 result lies within ``gamma (A + |bias|)`` of the exact
value with ``gamma = (Dpad + 64) 2^-23`` (twice the classical ``n u`` bound, which also covers
the slack's own rounding and q's conversion to float32). The bound adds that, plus ``1e-30`` for
underflow, so it is never below the float64 ``scale q.k (+ ALiBi)``. It adds ~0.6% of the int8
error term at D = 128.

**Non-finite keys.** A NaN in a group makes its scale NaN, an inf makes it inf (codes 0): the
token's bound is then NaN or +inf, never finite, so such a page can never be cleared.

Rows at or past a sequence's length are never read by the bound; prefill writes zeros there.
Each row is quantised on its own, so the sketch has no order state: it describes the rows that
were written to it, and the page statistics' order state (``KVPageStats.valid_for``) says
whether the appends came in order. Pure torch, fixed shapes, no host sync (the value checks
aside): the CPU path of the ``entmaxkv::triton_sketch_*`` ops and the oracle of their kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...math.reference import entmax_threshold
from .._common import spans
from ..certify.reference import sound_rows
from ..select.reference import compact_page_mask, selected_token_mask
from ...checks import (
    FLOAT_DTYPES,
    SKETCH_GROUP,
    check_kv_cache,
    check_positions,
    check_seqlens,
    check_sketch_bound_inputs,
    check_sketch_buffers,
    num_pages_for,
    sketch_groups,
)

__all__ = [
    "ABS_SLACK",
    "CODE_MAX",
    "HALF_STEP",
    "KeySketch",
    "SCALE_DTYPE",
    "bound_rel_slack",
    "quantize_rows",
    "round_scale_up",
    "sketch_append_",
    "sketch_bytes_per_head",
    "sketch_page_bounds",
    "sketch_delta_bound",
    "sketch_prefill_",
    "sketch_select",
    "sketch_tau_floor",
]

CODE_MAX = 127
SCALE_DTYPE = torch.bfloat16
HALF_STEP = 0.5 + 2.0 ** -16
ABS_SLACK = 1e-30


def sketch_bytes_per_head(head_dim: int) -> int:
    """Sketch bytes per token and KV head: ``D`` int8 codes + 2 bytes per 32-channel group."""
    return int(head_dim) + 2 * sketch_groups(head_dim)


def bound_rel_slack(head_dim: int) -> float:
    """``gamma`` of the module docstring: the relative float32 slack of a token bound."""
    return (sketch_groups(head_dim) * SKETCH_GROUP + 64) * 2.0 ** -23


def round_scale_up(s32: torch.Tensor) -> torch.Tensor:
    """float32 ``s32 >= 0`` (or NaN/inf) -> the bfloat16 scale, never below the exact
    ``absmax / 127`` of which ``s32`` is the float32 quotient: one ulp up (covers the
    division's rounding, subnormals included), then the next bfloat16 up. 0, inf and NaN stay."""
    bits = s32.view(torch.int32)
    up = ((bits + 0x10000) & -0x10000).view(torch.float32)
    keep = (s32 == 0) | ~torch.isfinite(s32)
    return torch.where(keep, s32, up).to(SCALE_DTYPE)


def quantize_rows(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``k [..., D]`` -> int8 codes ``[..., D]`` and bfloat16 scales ``[..., ceil(D/32)]``.

    ``c = clamp(floor(k / s + 1/2), -127, 127)`` in float32; a group whose scale is 0, inf or NaN
    gets codes 0 (its scale alone carries the key, or its non-finiteness, into the bound).
    """
    dim = k.shape[-1]
    groups = sketch_groups(dim)
    x = torch.nn.functional.pad(k.to(torch.float32), (0, groups * SKETCH_GROUP - dim))
    x = x.reshape(*k.shape[:-1], groups, SKETCH_GROUP)
    absmax = x.abs().amax(-1)  # NaN propagates
    scales = round_scale_up(absmax / CODE_MAX)
    s = scales.to(torch.float32)[..., None]
    usable = (s > 0) & torch.isfinite(s)
    q = torch.floor(x / torch.where(usable, s, 1.0) + 0.5).clamp(-CODE_MAX, CODE_MAX)
    codes = torch.where(usable, q, 0.0).reshape(*k.shape[:-1], groups * SKETCH_GROUP)[..., :dim]
    return codes.to(torch.int8), scales


def sketch_prefill_(k_cache: torch.Tensor, seqlens: torch.Tensor, codes: torch.Tensor,
                    scales: torch.Tensor) -> None:
    """Quantise the first ``seqlens[b]`` rows of ``k_cache`` into ``codes``/``scales`` in place;
    rows at or past the length get zeros. Vectorised over row spans of bounded size (``spans``)."""
    check_kv_cache("k_cache", k_cache)
    batch, kv_heads, capacity, head_dim = k_cache.shape
    check_sketch_buffers(codes, scales, batch=batch, kv_heads=kv_heads, capacity=capacity,
                         head_dim=head_dim)
    check_seqlens(seqlens, batch, capacity, device=k_cache.device, check_values=False)
    lengths = seqlens.to(torch.int64)[:, None]
    for start, stop in spans(capacity, batch * kv_heads * head_dim):
        new_codes, new_scales = quantize_rows(k_cache[:, :, start:stop])
        rows = torch.arange(start, stop, device=k_cache.device)
        valid = (rows[None, :] < lengths)[:, None, :, None]
        codes[:, :, start:stop].copy_(torch.where(valid, new_codes, 0))
        scales[:, :, start:stop].copy_(torch.where(valid, new_scales, 0))


def sketch_append_(k_cache: torch.Tensor, positions: torch.Tensor, codes: torch.Tensor,
                   scales: torch.Tensor) -> None:
    """Quantise the row written at ``positions[b]`` of each sequence, in place: O(D) per sequence
    and KV head. A position outside ``[0, Nmax)`` (possible only without value checks) reads and
    writes nothing."""
    check_kv_cache("k_cache", k_cache)
    batch, kv_heads, capacity, head_dim = k_cache.shape
    check_sketch_buffers(codes, scales, batch=batch, kv_heads=kv_heads, capacity=capacity,
                         head_dim=head_dim)
    check_positions(positions, batch, capacity, device=k_cache.device, check_values=False)
    inside = ((positions >= 0) & (positions < capacity)).view(batch, 1, 1, 1)
    pos = positions.to(torch.int64).clamp(0, capacity - 1).view(batch, 1, 1, 1)
    row = k_cache.gather(2, pos.expand(batch, kv_heads, 1, head_dim))
    new_codes, new_scales = quantize_rows(row)
    code_idx = pos.expand(batch, kv_heads, 1, head_dim)
    scale_idx = pos.expand(batch, kv_heads, 1, scales.shape[3])
    codes.scatter_(2, code_idx, torch.where(inside, new_codes, codes.gather(2, code_idx)))
    scales.scatter_(2, scale_idx, torch.where(inside, new_scales, scales.gather(2, scale_idx)))


def _token_bounds(q: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, seqlens: torch.Tensor,
                  scale: float, alibi_slopes: Optional[torch.Tensor], sides: tuple[bool, ...]
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-token score bounds ``[B, Hkv, Gq, Nmax]``, one per entry of ``sides`` (True: upper,
    False: lower, the same float32 form with the half step and the slack subtracted), from one
    pass over the codes, and the valid-row mask ``[B, Nmax]``."""
    batch, hq, _, dim = q.shape
    hkv, capacity, groups = codes.shape[1], codes.shape[2], scales.shape[3]
    group = hq // hkv
    width = groups * SKETCH_GROUP
    qf = torch.nn.functional.pad(q[:, :, 0].to(torch.float32), (0, width - dim))
    qf = qf.reshape(batch, hkv, group, groups, SKETCH_GROUP)
    c = torch.nn.functional.pad(codes.to(torch.float32), (0, width - dim))
    c = c.reshape(batch, hkv, capacity, groups, SKETCH_GROUP)
    s = scales.to(torch.float32)  # [B, Hkv, N, G]
    dots = torch.einsum("bhqgd,bhngd->bhqng", qf, c)  # [B, Hkv, Gq, N, G]
    qabs = qf.abs().sum(-1)[:, :, :, None, :]  # [B, Hkv, Gq, 1, G]
    s5 = s[:, :, None]
    mag = (s5 * qabs).sum(-1)
    # the float32 scale as a Python number: no host-to-device copy (the step may be captured)
    scale32 = float(torch.tensor(scale, dtype=torch.float32))
    slack = (128.0 * scale32) * mag
    bias = 0.0
    length = seqlens.to(torch.int64).clamp(0, capacity)
    if alibi_slopes is not None:
        offs = (torch.arange(capacity, device=q.device)[None, :] - (length[:, None] - 1))
        slopes = alibi_slopes.to(torch.float32).reshape(1, hkv, group, 1)
        bias = slopes * offs.to(torch.float32)[:, None, None, :]
        slack = slack + bias.abs()
    margin = bound_rel_slack(dim) * slack + ABS_SLACK
    bounds = []
    for upper in sides:
        sign = 1.0 if upper else -1.0
        token = (s5 * (dots + sign * HALF_STEP * qabs)).sum(-1)  # [B, Hkv, Gq, N]
        bounds.append(scale32 * token + bias + sign * margin)
    valid = torch.arange(capacity, device=q.device)[None, :] < length[:, None]
    return bounds, valid


def sketch_page_bounds(
    q: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    seqlens: torch.Tensor,
    candidates: torch.Tensor,
    *,
    page_size: int,
    scale: float,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Upper bounds of each candidate page's largest score, per query head.

    Args:
        q: ``[B, Hq, 1, D]``; query head ``h`` reads KV head ``h // (Hq / Hkv)``.
        codes, scales: the sketch (:meth:`KeySketch.buffers`).
        seqlens: int ``[B]``, tokens per sequence; rows at or past it are never read.
        candidates: bool ``[B, Hkv, ceil(Nmax / page_size)]``, the pages to bound.
        page_size: tokens per page; scale: the score scale (> 0);
        alibi_slopes: None or ``[Hq]``: scores get ``slope_h * (i - (L - 1))``.

    Returns:
        float32 ``[B, Hq, Npages]``: for each candidate page a value never below the float64
        ``max_i scale q.k_i (+ bias_i)`` over its valid tokens; ``-inf`` for pages that are not
        candidates or hold no valid token; NaN or +inf when a valid token's key was not finite.
    """
    page_size, scale = check_sketch_bound_inputs(q, codes, scales, seqlens, candidates, page_size,
                                                 scale, alibi_slopes)
    batch, hq = q.shape[:2]
    hkv, capacity = codes.shape[1], codes.shape[2]
    num_pages = num_pages_for(capacity, page_size)
    (ub,), valid = _token_bounds(q, codes, scales, seqlens, scale, alibi_slopes, sides=(True,))
    pad = num_pages * page_size - capacity
    ub = torch.nn.functional.pad(ub, (0, pad))
    valid = torch.nn.functional.pad(valid, (0, pad))
    ub = torch.where(valid[:, None, None, :], ub, float("-inf"))
    page_max = ub.reshape(batch, hkv, hq // hkv, num_pages, page_size).amax(-1)  # NaN propagates
    keep = candidates[:, :, None, :]
    return torch.where(keep, page_max, float("-inf")).reshape(batch, hq, num_pages)


def sketch_tau_floor(
    q: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    alpha: float,
    scale: float,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A lower bound of each query head's exact entmax threshold over all of its valid tokens.

    The threshold is non-decreasing in every score (raising one raises ``sum [z - t]_+^beta`` at
    every ``t``, so the root moves right), so the exact threshold of the sketch's per-token
    *lower* score bounds never exceeds the threshold of the true scores. The certified step uses
    it as its floor: a page whose upper bound is at or below it holds no support token of full
    entmax, whatever the selection missed. Float32 ``[B, Hq]`` in the decode's z units
    (``(alpha-1) x - tau``), rounded down by ``2^-12 (1 + |tau|)`` for the threshold solve's own
    rounding; ``-inf`` where it says nothing (a non-finite key, nothing to attend).
    """
    (lb,), valid = _token_bounds(q, codes, scales, seqlens, float(scale), alibi_slopes, sides=(False,))
    return _floor_of(lb, valid, alpha)


def _floor_of(lb: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`sketch_tau_floor` from the lower bounds ``[B, Hkv, Gq, Nmax]`` and the valid rows."""
    batch, hq = lb.shape[0], lb.shape[1] * lb.shape[2]
    mask = valid[:, None, None, :].expand_as(lb)
    # a non-finite key gives a NaN or infinite bound: that head's true scores are not finite, it
    # is never certified, and its floor says nothing
    silent = (mask & ~torch.isfinite(lb)).any(-1).reshape(batch, hq)
    tau = entmax_threshold(lb.to(torch.float64), alpha, mask=mask).reshape(batch, hq)
    tau = tau - 2.0 ** -12 * (1.0 + tau.abs())
    return torch.where(torch.isfinite(tau) & ~silent, tau, float("-inf")).to(torch.float32)


def sketch_select(
    q: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    seqlens: torch.Tensor,
    read_all: torch.Tensor,
    *,
    page_size: int,
    alpha: float,
    scale: float,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The certified step's selection from the sketch: every valid page whose upper bound
    exceeds the floor (:func:`sketch_tau_floor`) for some head of its group (a NaN bound keeps
    its page), and every valid page of a ``read_all`` row (bool ``[B]``). A page left out holds
    no support token of full entmax, so one decode over the selection is certified by
    construction. Returns ``(page_indices, num_selected, floor)`` as ``compact_page_mask`` plus
    the floor ``[B, Hq]``, ``-inf`` on read-all rows (they rest on no bound)."""
    batch, kv_heads, capacity = codes.shape[:3]
    num_pages = num_pages_for(capacity, page_size)
    floor = sketch_tau_floor(q, codes, scales, seqlens, alpha=alpha, scale=scale, alibi_slopes=alibi_slopes)
    floor = torch.where(read_all[:, None], float("-inf"), floor)
    pages = torch.arange(num_pages, device=q.device)
    valid = (pages[None, :] * page_size < seqlens[:, None]).unsqueeze(1).expand(batch, kv_heads, num_pages)
    bounded = valid & ~read_all[:, None, None]
    bounds = sketch_page_bounds(q, codes, scales, seqlens, bounded, page_size=page_size, scale=scale,
                                alibi_slopes=alibi_slopes)
    above = ~((alpha - 1.0) * bounds <= floor[..., None])
    needed = (above.reshape(batch, kv_heads, -1, num_pages).any(2) & bounded) | (valid & read_all[:, None, None])
    page_indices, num_selected = compact_page_mask(needed)
    return page_indices, num_selected, floor


def sketch_delta_bound(
    q: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    seqlens: torch.Tensor,
    page_indices: torch.Tensor,
    num_selected: torch.Tensor,
    tau: torch.Tensor,
    *,
    page_size: int,
    alpha: float,
    scale: float,
    alibi_slopes: Optional[torch.Tensor] = None,
    stats_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A bound on the full-entmax mass of the tokens outside the selected pages, per query head.

    Full entmax gives token ``i`` the mass ``[(alpha-1) s_i - tau_full]_+^beta``; with ``ub_i``
    the sketch's upper score bound and ``t = max(tau, sketch floor) <= tau_full`` (``tau`` the
    threshold over the selected tokens, never above the full one), the sum of
    ``[(alpha-1) ub_i - t]_+^beta`` over the unselected valid tokens bounds what the selection
    dropped, token by token instead of page by page (the Quest form counts every token of a page
    at the page's box bound). 0 means no unselected token can be in the support: the output is
    full entmax. Float32 ``[B, Hq]`` in ``[0, 1]``; 1 (the trivial bound) where the inputs are not
    sound: a non-finite ``tau`` or key bound, a length outside ``[1, Nmax]``, or ``stats_valid``
    (bool ``[B]``, the statistics' order state, which the sketch's appends share) False.
    """
    batch, hq = q.shape[:2]
    hkv, capacity = codes.shape[1], codes.shape[2]
    (ub, lb), valid = _token_bounds(q, codes, scales, seqlens, float(scale), alibi_slopes, sides=(True, False))
    floor = _floor_of(lb, valid, alpha)
    t = torch.maximum(tau.to(torch.float64), floor.to(torch.float64)).reshape(batch, hkv, hq // hkv, 1)
    chosen = selected_token_mask(page_indices, num_selected, seqlens, page_size=page_size, max_seqlen=capacity)
    dropped = (valid[:, None, :] & ~chosen)[:, :, None, :]  # [B, Hkv, 1, N]
    excess = torch.clamp((alpha - 1.0) * ub.to(torch.float64) - t, min=0.0)
    mass = torch.where(dropped, excess.pow(1.0 / (alpha - 1.0)), 0.0).sum(-1).reshape(batch, hq)
    finite_bounds = (torch.isfinite(ub) | ~valid[:, None, None, :]).all(-1).reshape(batch, hq)
    sound = sound_rows(seqlens, capacity, stats_valid)
    ok = finite_bounds & torch.isfinite(tau) & sound[:, None] & torch.isfinite(mass)
    return torch.where(ok, mass.clamp(max=1.0), 1.0).to(torch.float32)


class KeySketch:
    """The int8 key sketch of one layer's K cache: ``codes`` int8 ``[B, Hkv, Nmax, D]`` and
    ``scales`` bfloat16 ``[B, Hkv, Nmax, ceil(D/32)]`` (see the module docstring).

    Allocated once (``allocate`` or ``from_cache``) and updated in place by ``prefill`` and
    ``append``, so the buffers' addresses stay fixed (CUDA-graph friendly). ``dtype`` is the K
    cache's dtype, checked on every update; the sketch itself does not depend on it.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        check_sketch_buffers(codes, scales)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        self.codes, self.scales, self.dtype = codes, scales, dtype

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str | None) -> "KeySketch":
        """Zeroed buffers for a K cache ``[batch, kv_heads, capacity, head_dim]`` of ``dtype``."""
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch, kv_heads, capacity)
        return cls(torch.zeros((*shape, head_dim), dtype=torch.int8, device=device),
                   torch.zeros((*shape, sketch_groups(head_dim)), dtype=SCALE_DTYPE, device=device),
                   dtype)

    @classmethod
    def from_cache(cls, k_cache: torch.Tensor, seqlens: torch.Tensor, *,
                   check_values: bool = True) -> "KeySketch":
        """Allocate a sketch matching ``k_cache`` and prefill it from its first ``seqlens`` rows."""
        check_kv_cache("k_cache", k_cache)
        sketch = cls.allocate(*k_cache.shape, dtype=k_cache.dtype, device=k_cache.device)
        sketch.prefill(k_cache, seqlens, check_values=check_values)
        return sketch

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scales)``, the argument order of :func:`sketch_page_bounds` and the ops."""
        return self.codes, self.scales

    def bytes_per_token(self) -> int:
        """Bytes this sketch stores per token over all its KV heads (``Hkv * (D + 2 ceil(D/32))``)."""
        return self.codes.shape[1] * sketch_bytes_per_head(self.codes.shape[3])

    def prefill(self, k_cache: torch.Tensor, seqlens: torch.Tensor, *, check_values: bool = True) -> None:
        """Re-quantise every row from the first ``seqlens[b]`` rows of ``k_cache`` (zeros past them)."""
        self.check_cache(k_cache)
        check_seqlens(seqlens, k_cache.shape[0], k_cache.shape[2], device=k_cache.device,
                      check_values=check_values)
        sketch_prefill_(k_cache, seqlens, self.codes, self.scales)

    def append(self, k_cache: torch.Tensor, positions: torch.Tensor, *, check_values: bool = True) -> None:
        """Quantise the rows just written at ``positions`` (int ``[B]``): O(D) per sequence."""
        self.check_cache(k_cache)
        check_positions(positions, k_cache.shape[0], k_cache.shape[2], device=k_cache.device,
                        check_values=check_values)
        sketch_append_(k_cache, positions, self.codes, self.scales)

    def check_cache(self, k_cache: torch.Tensor) -> None:
        """Raise unless ``k_cache`` has the shape, dtype and device this sketch describes."""
        check_kv_cache("k_cache", k_cache)
        if tuple(k_cache.shape) != tuple(self.codes.shape):
            raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match this sketch "
                             f"{tuple(self.codes.shape)} ([B, Hkv, Nmax, D])")
        if k_cache.dtype != self.dtype:
            raise TypeError(f"k_cache must have the sketch's cache dtype {self.dtype}, got {k_cache.dtype}")
        if k_cache.device != self.codes.device:
            raise ValueError(f"k_cache must be on the sketch's device {self.codes.device}, "
                             f"got {k_cache.device}")
