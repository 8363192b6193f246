"""Sparse entmax decode over selected pages, the support certificate, and the certified loop.

``paged_decode`` attends over the valid tokens of the selected pages with the exact threshold of
those tokens; ``certify`` proves (or bounds the failure of) "the unselected pages hold no support";
``sparse_decode`` is the eager public step: validate, then run the shared step of ``step.py``
(select, decode, certify; in ``"certified"`` mode add the violating pages, so the result equals
full entmax). All pure torch, fixed-shape, no
host syncs past the input validation: the CPU implementation of the ops and the kernels' oracle.
"""

from __future__ import annotations

import math

import torch

from .stats.reference import KVPageStats, page_token_counts
from ..config import EntmaxKVConfig, check_alpha
from ..math.reference import entmax_beta, entmax_probs_and_threshold
from .step import DecodeResult, implementation_for, run_step
from .select.reference import (
    check_bound_inputs,
    compute_dtype,
    page_mask_from_indices,
    quest_bounds_in,
    valid_page_mask,
)
from ..checks import (
    check_decode_inputs,
    check_page_size,
    check_page_table,
    check_scale,
    check_stats_valid,
    check_tensor,
    num_pages_for,
)

__all__ = ["DecodeResult", "certify", "paged_decode", "sparse_decode"]


def _decode_in(q, k_cache, v_cache, seqlens, page_mask, page_size, alpha, scale, alibi_slopes):
    """Exact entmax over the tokens of ``page_mask`` (bool ``[B, Hkv, Npages]``).

    Returns ``out`` in q's dtype and ``tau [B, Hq]`` in the compute dtype. Scores of all rows are
    computed, then masked; the solve is relative to each head's max score (shift-invariant, see
    ``reference``). Lengths are clamped to ``[0, Nmax]``. A V row reaches the output only when it
    is in the support of some query head of its KV group (as in the kernels, which read V only
    there), so garbage in unattended rows cannot leak through ``0 * NaN``. Edge cases
    (docs/EDGE_INPUTS.md): a head whose attended scores hold a NaN or ``+inf`` gets NaN ``out``
    and ``tau``; a head with nothing to attend gets ``out = 0`` and ``tau = +inf``.
    """
    dtype = compute_dtype(q)
    batch, q_heads, _, head_dim = q.shape
    kv_heads, max_seqlen = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    rows = torch.arange(max_seqlen, device=q.device)
    inside = rows[None, :] < seqlens.to(torch.int64)[:, None]  # [B, N]
    tokens = page_mask.repeat_interleave(page_size, dim=-1)[..., :max_seqlen] & inside[:, None, :]
    mask = tokens[:, :, None, :]  # [B, Hkv, 1, N], shared by the query group

    qg = q.reshape(batch, kv_heads, group, head_dim).to(dtype)
    scores = (qg @ k_cache.to(dtype).transpose(-1, -2)) * scale  # [B, Hkv, G, N]
    if alibi_slopes is not None:
        rel = (rows[None, :] - (seqlens.to(torch.int64)[:, None] - 1)).to(dtype)  # [B, N]
        scores = scores + alibi_slopes.to(dtype).reshape(1, kv_heads, group, 1) * rel[:, None, None, :]
    p, tau = entmax_probs_and_threshold(scores, alpha, dim=-1, mask=mask.expand_as(scores))
    live = (p > 0).any(2)  # [B, Hkv, N]: in the support of some head of the group
    v = torch.where(live[..., None], v_cache.to(dtype), 0.0)
    out = p @ v
    return out.reshape(batch, q_heads, 1, head_dim).to(q.dtype), tau.to(dtype).reshape(batch, q_heads)


def _page_excess(q, kmin, kmax, seqlens, page_mask, tau, page_size, alpha, scale, alibi_slopes):
    """``((alpha-1) u_p - tau)`` ``[B, Hq, Npages]`` and the mask of unselected valid pages."""
    dtype = torch.float64 if torch.float64 in (q.dtype, tau.dtype) else torch.float32
    batch, q_heads = q.shape[:2]
    kv_heads, num_pages = kmin.shape[1], kmin.shape[2]
    bounds = quest_bounds_in(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes, dtype)
    excess = (alpha - 1.0) * bounds - tau.to(dtype)[..., None]
    selected = page_mask.repeat_interleave(q_heads // kv_heads, dim=1)
    unselected = ~selected & valid_page_mask(seqlens, page_size, num_pages)[:, None, :]
    return excess, unselected


def _certify_in(q, kmin, kmax, seqlens, page_mask, tau, page_size, alpha, scale, alibi_slopes, stats_valid=None):
    """``certified [B, Hq]`` and ``delta_bound [B, Hq]`` (compute dtype); see :func:`certify`."""
    excess, unselected = _page_excess(q, kmin, kmax, seqlens, page_mask, tau, page_size, alpha, scale, alibi_slopes)
    trusted = certificate_inputs_ok(excess, tau, seqlens, page_size, stats_valid)
    certified = trusted & ~(unselected & (excess > 0)).any(-1)
    counts = page_token_counts(seqlens, page_size, kmin.shape[2]).to(excess.dtype)[:, None, :]
    dropped = torch.where(unselected & trusted[..., None], counts * excess.clamp(min=0) ** entmax_beta(alpha), 0.0)
    return certified, torch.where(trusted, dropped.sum(-1).clamp(max=1.0), 1.0)


def certificate_inputs_ok(
    excess: torch.Tensor,
    tau: torch.Tensor,
    seqlens: torch.Tensor,
    page_size: int,
    stats_valid: torch.Tensor | None,
) -> torch.Tensor:
    """bool ``[B, Hq]``: everything the certificate rests on is sound for that head.

    ``excess [B, Hq, Npages]`` is ``(alpha-1) u_p - tau`` with ``-inf`` on pages past the length;
    it is finite on every valid page iff the bounds are, i.e. iff q, the ALiBi slope, kmin and kmax
    are finite there (a non-finite stat or q entry makes the bound NaN or infinite: ``0 * inf`` is
    NaN) and tau is finite (NaN when an attended score was, +inf when nothing was attended). The
    length must lie in ``[1, Npages * P]`` and ``stats_valid`` (bool ``[B]``, e.g.
    ``KVPageStats.valid_for(seqlens)``), when given, must hold. Shared by the kernels' certify.
    """
    num_pages = excess.shape[-1]
    valid_pages = valid_page_mask(seqlens, page_size, num_pages)[:, None, :]
    finite = (torch.isfinite(excess) | ~valid_pages).all(-1) & torch.isfinite(tau)
    length = seqlens.to(torch.int64)
    in_range = (length >= 1) & (length <= num_pages * page_size)
    if stats_valid is not None:
        in_range = in_range & stats_valid
    return finite & in_range[:, None]


def _check_common(q, k_cache, v_cache, seqlens, page_size, alpha, scale, alibi_slopes) -> tuple[int, float, float]:
    check_decode_inputs(q, k_cache, v_cache, seqlens, alibi_slopes, check_values=False)
    return check_page_size(page_size), check_alpha(alpha), check_scale(scale)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    page_indices: torch.Tensor,
    num_selected: torch.Tensor,
    *,
    page_size: int,
    alpha: float,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact entmax attention over the valid tokens of the selected pages.

    Query head ``h`` attends the pages selected for KV head ``h // G``; ``tau`` is solved exactly
    on those tokens (float32, float64 for float64 inputs) and the output is divided by ``sum p``.
    Returns ``out [B, Hq, 1, D]`` in q's dtype and ``tau`` float32 ``[B, Hq]``. A KV head with no
    selected valid token has nothing to attend: its rows come out NaN (``select_pages`` always
    selects the last valid page, so this only happens with hand-made page tables).
    """
    page_size, alpha, scale = _check_common(q, k_cache, v_cache, seqlens, page_size, alpha, scale, alibi_slopes)
    batch, kv_heads, max_seqlen, _ = k_cache.shape
    num_pages = num_pages_for(max_seqlen, page_size)
    check_page_table(page_indices, num_selected, batch=batch, kv_heads=kv_heads, num_pages=num_pages,
                     device=q.device)
    page_mask = page_mask_from_indices(page_indices, num_selected, num_pages)
    out, tau = _decode_in(q, k_cache, v_cache, seqlens, page_mask, page_size, alpha, scale, alibi_slopes)
    return out, tau.to(torch.float32)


def certify(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    seqlens: torch.Tensor,
    page_indices: torch.Tensor,
    num_selected: torch.Tensor,
    tau: torch.Tensor,
    *,
    page_size: int,
    alpha: float,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    stats_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The support certificate of a selection, per query head.

    ``certified[b, h]``: every unselected valid page has ``(alpha-1) u_p <= tau`` (``u_p`` the
    Quest bound), so no unselected token can be in the full-entmax support (tau only grows when
    tokens are added) and the sparse output equals full entmax. ``delta_bound[b, h] =
    min(1, sum_{unselected p} n_p [(alpha-1) u_p - tau]_+^beta)`` bounds the full-entmax mass of
    the unselected tokens. Returns (bool ``[B, Hq]``, float32 ``[B, Hq]``).

    A certificate needs sound inputs (:func:`certificate_inputs_ok`): where q, the ALiBi slope,
    kmin/kmax of a valid page or tau are not finite, the length lies outside ``[1, Npages * P]``
    or ``stats_valid`` (optional bool ``[B]``, see ``KVPageStats.valid_for``) is False, the head
    gets ``certified = False`` and ``delta_bound = 1`` (the trivial bound).
    """
    page_size, scale = check_bound_inputs(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes)
    alpha = check_alpha(alpha)
    batch, kv_heads, num_pages, _ = kmin.shape
    check_page_table(page_indices, num_selected, batch=batch, kv_heads=kv_heads, num_pages=num_pages,
                     device=q.device)
    check_tensor("tau", tau)
    if tuple(tau.shape) != tuple(q.shape[:2]) or not tau.dtype.is_floating_point:
        raise ValueError(f"tau must be a float tensor of shape [B, Hq] = {list(q.shape[:2])}, got "
                         f"{tau.dtype} {tuple(tau.shape)}")
    check_stats_valid(stats_valid, batch, q.device)
    page_mask = page_mask_from_indices(page_indices, num_selected, num_pages)
    certified, delta = _certify_in(q, kmin, kmax, seqlens, page_mask, tau, page_size, alpha, scale, alibi_slopes,
                                   stats_valid)
    return certified, delta.to(torch.float32)


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    config: EntmaxKVConfig | None = None,
    stats: KVPageStats | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    check_values: bool = True,
) -> DecodeResult:
    """One support-aware entmax decode step (the eager public API).

    Validates the inputs (``check_values=False`` skips the checks that synchronise), builds the
    page statistics from the cache when ``stats`` is None, selects pages with ``config.selector``
    (alpha defaults to 1.5, ``scale`` to ``1/sqrt(D)``), decodes exactly over them and certifies,
    through :func:`entmaxkv_compile.step.run_step` on the Triton kernels when they can run on q's
    device and on this module's reference otherwise. ``"certified"`` output equals full entmax.
    """
    check_decode_inputs(q, k_cache, v_cache, seqlens, alibi_slopes, check_values=check_values)
    if config is None:
        config = EntmaxKVConfig()
    elif not isinstance(config, EntmaxKVConfig):
        raise TypeError(f"config must be an EntmaxKVConfig or None, got {type(config).__name__}")
    alpha = config.resolved_alpha(1.5)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_scale(scale)
    page_size = config.page_size
    if stats is None:
        stats = KVPageStats.from_cache(k_cache, seqlens, page_size, check_values=False)
    elif not isinstance(stats, KVPageStats):
        raise TypeError(f"stats must be a KVPageStats or None, got {type(stats).__name__}")
    elif stats.page_size != page_size:
        raise ValueError(f"stats.page_size ({stats.page_size}) must equal config.page_size ({page_size})")
    else:
        stats.check_cache(k_cache)

    impl = implementation_for(q.device, q.dtype)
    return run_step(impl, q, k_cache, v_cache, seqlens, stats.buffers(), config, alpha=alpha, scale=scale,
                    alibi_slopes=alibi_slopes)
