"""Page scoring and selection: Quest bounds, the gaussian and top-k selectors, forced pages.

Everything is batched, fixed-shape and free of host syncs: a selection is a boolean page mask
``[B, Hkv, Npages]`` (the union over each KV head's query group) compacted by a sort into the
fixed-capacity ``page_indices``/``num_selected`` pair of docs/ARCHITECTURE.md. These functions are
the CPU implementation of the ``select_pages`` op and the oracle of its kernels.
"""

from __future__ import annotations

import math

import torch

from ...checks import check_bound_inputs, check_int_arg, check_row_start, check_softcap, check_stats_buffers
from ...config import SELECTORS, TAU_ESTIMATES, check_alpha
from ...math.gaussian import gaussian_threshold, mixture_threshold, page_max_quantile_z
from ...math.softcap import apply_softcap
from ..paged import gather_stats
from ..stats.reference import page_token_counts

__all__ = [
    "compact_page_mask",
    "drop_pages_below_start",
    "page_mask_from_indices",
    "quest_bounds",
    "select_pages",
    "selected_token_mask",
]

PAGE_SELECTORS: tuple[str, ...] = tuple(s for s in SELECTORS if s != "certified")


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 for float64 queries (exactness tests), float32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def valid_page_mask(seqlens: torch.Tensor, page_size: int, num_pages: int) -> torch.Tensor:
    """bool ``[B, Npages]``: page ``p`` holds at least one of the sequence's tokens."""
    return page_token_counts(seqlens, page_size, num_pages) > 0


def pages_from_start(row_start: torch.Tensor, page_size: int, num_pages: int) -> torch.Tensor:
    """bool ``[B, Npages]``: page ``p`` ends after ``row_start[b]`` (it holds an attended row of a
    left-padded sequence; the pages before lie wholly in its hidden prefix)."""
    pages = torch.arange(num_pages, device=row_start.device)[None, :]
    return pages >= (row_start.to(torch.int64).clamp(min=0) // page_size)[:, None]


def forced_page_mask(
    seqlens: torch.Tensor, page_size: int, num_pages: int, sink_pages: int, recent_pages: int
) -> torch.Tensor:
    """bool ``[B, Npages]``: the last valid page, the first ``sink_pages`` and the
    ``recent_pages`` before the last, restricted to valid pages."""
    pages = torch.arange(num_pages, device=seqlens.device)[None, :]
    last = ((seqlens.to(torch.int64) - 1) // page_size)[:, None]
    forced = (pages == last) | (pages < sink_pages) | ((pages >= last - recent_pages) & (pages < last))
    return forced & (pages <= last)


def compact_page_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Page mask ``[..., Npages]`` -> (``page_indices`` int32, ascending then -1, ``num_selected`` int32).

    A sort of ``where(mask, page, Npages)`` keeps the shape fixed (no ``nonzero``).
    """
    num_pages = mask.shape[-1]
    pages = torch.arange(num_pages, device=mask.device)
    keys = torch.where(mask, pages, num_pages).sort(dim=-1).values
    page_indices = torch.where(keys < num_pages, keys, -1).to(torch.int32)
    return page_indices, mask.sum(-1, dtype=torch.int32)


def drop_pages_below_start(
    page_indices: torch.Tensor, num_selected: torch.Tensor, row_start: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove from a page table (ascending then -1) every page lying entirely below ``row_start[b]``.

    Those pages hold only a hidden prefix (left padding): attending them would add nothing, and
    no certificate needs their bounds, since none of their tokens is a candidate of full entmax
    over ``[row_start, seqlens)``. They form a prefix of each ascending table, so a shift by their
    count (a gather, fixed shape, no sync) removes them. A page that straddles the start is kept:
    its bounds cover rows that are not attended, so they stay upper bounds (only looser).
    """
    first_page = (row_start.to(torch.int64).clamp(min=0) // page_size)[:, None, None]  # [B, 1, 1]
    slots = torch.arange(page_indices.shape[-1], device=page_indices.device)
    ids = page_indices.to(torch.int64)
    below = ((slots < num_selected[..., None]) & (ids >= 0) & (ids < first_page)).sum(-1)  # [B, Hkv]
    source = (slots + below[..., None]).clamp(max=page_indices.shape[-1] - 1)
    kept = num_selected.to(torch.int64) - below
    shifted = torch.where(slots < kept[..., None], page_indices.gather(-1, source), -1)
    return shifted.to(page_indices.dtype), kept.to(num_selected.dtype)


def page_mask_from_indices(page_indices: torch.Tensor, num_selected: torch.Tensor, num_pages: int) -> torch.Tensor:
    """Inverse of :func:`compact_page_mask`: bool ``[B, Hkv, Npages]`` from the first
    ``num_selected`` entries of ``page_indices`` (out-of-range ids are ignored)."""
    slots = torch.arange(page_indices.shape[-1], device=page_indices.device)
    ids = page_indices.to(torch.int64)
    used = (slots < num_selected[..., None]) & (ids >= 0) & (ids < num_pages)
    target = torch.where(used, ids, num_pages)
    mask = torch.zeros(*page_indices.shape[:-1], num_pages + 1, dtype=torch.bool, device=page_indices.device)
    mask.scatter_(-1, target, True)
    return mask[..., :num_pages]


def selected_token_mask(
    page_indices: torch.Tensor, num_selected: torch.Tensor, seqlens: torch.Tensor, *, page_size: int, max_seqlen: int
) -> torch.Tensor:
    """bool ``[B, Hkv, max_seqlen]``: token ``j`` lies in a selected page and ``j < seqlens[b]``."""
    num_pages = -(-max_seqlen // page_size)
    pages = page_mask_from_indices(page_indices, num_selected, num_pages)
    tokens = pages.repeat_interleave(page_size, dim=-1)[..., :max_seqlen]
    inside = torch.arange(max_seqlen, device=seqlens.device)[None, :] < seqlens.to(torch.int64)[:, None]
    return tokens & inside[:, None, :]


def _grouped_query(q: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    batch, q_heads, _, head_dim = q.shape
    return q.reshape(batch, kv_heads, q_heads // kv_heads, head_dim).to(dtype)


def _alibi_page_max_bias(
    alibi_slopes: torch.Tensor, seqlens: torch.Tensor, page_size: int, num_pages: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[B, Hq, Npages]``: the largest ALiBi bias ``slope*(j-(L-1))`` over the page's valid rows."""
    length = seqlens.to(dtype)[:, None]
    first = torch.arange(num_pages, device=seqlens.device, dtype=dtype)[None, :] * page_size
    last = torch.minimum(first + (page_size - 1), length - 1)
    slopes = alibi_slopes.to(dtype)[None, :, None]
    return torch.maximum(slopes * (first - (length - 1))[:, None, :], slopes * (last - (length - 1))[:, None, :])


def quest_bounds_in(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    seqlens: torch.Tensor,
    page_size: int,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    dtype: torch.dtype,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Quest bounds ``[B, Hq, Npages]`` computed in ``dtype`` (no validation; see :func:`quest_bounds`)."""
    batch, q_heads = q.shape[:2]
    kv_heads, num_pages = kmin.shape[1], kmin.shape[2]
    qg = _grouped_query(q, kv_heads, dtype)
    bound = qg.clamp(min=0) @ kmax.to(dtype).transpose(-1, -2) + qg.clamp(max=0) @ kmin.to(dtype).transpose(-1, -2)
    bound = bound.reshape(batch, q_heads, num_pages) * scale
    if alibi_slopes is not None:
        bound = bound + _alibi_page_max_bias(alibi_slopes, seqlens, page_size, num_pages, dtype)
    # The cap is increasing, so the capped bound of the raw scores bounds every capped score.
    bound = apply_softcap(bound, softcap)
    valid = valid_page_mask(seqlens, page_size, num_pages)[:, None, :]
    return torch.where(valid, bound, float("-inf"))


def head_normalized_group_score(bounds: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Top-k page score per KV head: the max over the query group of each head's Quest bound
    *relative to that head's best page* (``[B, Hq, Np]`` -> ``[B, Hkv, Np]``).

    Entmax support is decided relative to the row maximum (tau >= max z - 1), so a page matters
    to a head by how close its bound comes to the head's best page. Ranking raw bounds instead
    lets heads with large scores (e.g. NoPE heads beside ALiBi heads in one group) take every
    slot; on the tiny trained LM this cut perplexity at a 10% budget from 5.76 to 2.65
    (benchmarks/QUALITY.md).

    A page whose bound is NaN or ``+inf`` (non-finite q, stats or ALiBi slope) scores ``+inf``,
    like a forced page: it may hold anything, so it is attended rather than silently dropped, and
    the finite pages keep their ranking among themselves.
    """
    batch, q_heads, num_pages = bounds.shape
    wild = torch.isnan(bounds) | (bounds == float("inf"))
    tame = torch.where(wild, float("-inf"), bounds)
    best = tame.amax(-1, keepdim=True)
    relative = torch.where(wild, float("inf"), tame - torch.where(torch.isfinite(best), best, 0.0))
    return relative.reshape(batch, kv_heads, q_heads // kv_heads, num_pages).amax(2)


def top_pages_lowest_id_ties(score: torch.Tensor, count: int) -> torch.Tensor:
    """bool mask of the ``count`` highest scores along the last axis, ties to the lowest index.

    Written with a value-only top-k, comparisons and a cumsum (no stable sort), so it exports to
    ONNX; the kernel path calls it too (on device, sync-free).
    """
    kth = score.topk(count, dim=-1).values[..., -1:]
    above = score > kth
    tied = score == kth
    room = count - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def quest_bounds(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    page_size: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Per query head and page, an upper bound of every score in the page: float32 ``[B, Hq, Npages]``.

    ``u_p = scale * sum_d max(q_d*kmin_pd, q_d*kmax_pd)`` plus the largest ALiBi bias inside the
    page, passed through the soft-cap ``softcap * tanh(u / softcap)`` when ``softcap > 0`` (the
    cap is increasing, so it bounds the capped scores); ``-inf`` on pages with no valid token.
    Query head ``h`` reads KV head ``h // G``.
    """
    page_size, scale = check_bound_inputs(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes)
    return quest_bounds_unchecked(q, kmin, kmax, seqlens, page_size=page_size, scale=scale, alibi_slopes=alibi_slopes,
                                  softcap=check_softcap(softcap))


def quest_bounds_unchecked(q, kmin, kmax, seqlens, *, page_size, scale, alibi_slopes=None,
                           softcap=0.0, block_table=None) -> torch.Tensor:
    """:func:`quest_bounds` for a caller that has validated its arguments (the step);
    ``block_table``: per-block statistics gathered through it (``runtime/paged.py``)."""
    if block_table is not None:
        kmin, kmax = gather_stats(block_table, seqlens, page_size, kmin, kmax)
    return quest_bounds_in(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes, compute_dtype(q),
                           softcap).to(torch.float32)


def _gaussian_keep(q, kmean, km2, seqlens, page_size, alpha, scale, max_quantile, margin, mixture, alibi_slopes,
                   row_start=None):
    """bool ``[B, Hq, Npages]``: pages whose likely maximum score clears the estimated threshold
    (the pages wholly below ``row_start`` count as empty: no weight in the estimate, never kept)."""
    dtype = compute_dtype(q)
    batch, q_heads = q.shape[:2]
    kv_heads, num_pages = kmean.shape[1], kmean.shape[2]
    counts = page_token_counts(seqlens, page_size, num_pages).to(dtype)  # [B, Np]
    if row_start is not None:
        counts = torch.where(pages_from_start(row_start, page_size, num_pages), counts, 0.0)
    valid = (counts > 0)[:, None, :]
    var = km2.to(dtype) / counts.clamp(min=1)[:, None, :, None]
    qg = _grouped_query(q, kv_heads, dtype)
    mu = (qg @ kmean.to(dtype).transpose(-1, -2)).reshape(batch, q_heads, num_pages) * scale
    var_score = ((qg * qg) @ var.transpose(-1, -2)).reshape(batch, q_heads, num_pages) * scale**2
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype)[None, :, None]
        length = seqlens.to(dtype)[:, None]
        mean_pos = torch.arange(num_pages, device=q.device, dtype=dtype)[None, :] * page_size + (counts - 1) / 2
        mu = mu + slopes * (mean_pos - (length - 1))[:, None, :]
        var_score = var_score + slopes**2 * ((counts * counts - 1) / 12)[:, None, :]
    mu = torch.where(valid, mu, 0.0)
    sigma = torch.where(valid, var_score.clamp(min=0), 0.0).sqrt()
    weights = counts[:, None, :]
    if mixture:
        tau_hat = mixture_threshold(mu, sigma, weights, alpha, dim=-1, check_values=False)
    else:
        total = seqlens.to(dtype)[:, None] if row_start is None else counts.sum(-1, keepdim=True).clamp(min=1)
        mu_g = (weights * mu).sum(-1) / total
        var_g = (weights * (sigma * sigma + (mu - mu_g[..., None]) ** 2)).sum(-1) / total
        tau_hat = gaussian_threshold(mu_g, var_g.clamp(min=0).sqrt(), total, alpha, check_values=False)
    z = page_max_quantile_z(counts.clamp(min=1), max_quantile, check_values=False)[:, None, :]
    likely_max = (alpha - 1) * (mu + z * sigma)
    # A page with non-finite moments (NaN/inf in K, q or the ALiBi slope) is kept: it may hold
    # anything, and dropping it would hide the bad value from the output.
    keep = (likely_max > tau_hat[..., None] - margin) | ~torch.isfinite(likely_max)
    return keep & valid


def select_pages(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    kmean: torch.Tensor,
    km2: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    page_size: int,
    alpha: float,
    scale: float,
    selector: str,
    token_budget: int,
    max_quantile: float,
    margin: float,
    tau_estimate: str,
    sink_pages: int,
    recent_pages: int,
    min_context: int,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    row_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the pages each KV head attends to: (``page_indices`` int32 ``[B, Hkv, Npages]``,
    ascending then -1; ``num_selected`` int32 ``[B, Hkv]``).

    ``selector``: ``"gaussian"`` keeps page ``p`` for query head ``h`` when
    ``(alpha-1)(mu_p + z_p sigma_p) > tau_hat - margin`` (DESIGN.md §3.3); ``"topk"`` ranks pages
    by the group's largest Quest bound and fills ``token_budget // page_size`` pages;
    ``"dense"`` keeps every valid page. Per KV head the selection is the union over its query
    group; the forced pages (last valid page, ``sink_pages``, ``recent_pages``) are always in,
    pages past the sequence never; sequences shorter than ``min_context`` keep all pages.

    ``softcap > 0`` (scores ``softcap * tanh(s / softcap)``): top-k ranks the capped Quest bounds
    (the cap is increasing, so each head's order is the raw one, and the comparison across the
    group's heads is made in the space entmax sees). The gaussian selector keeps working on the
    raw scores: its page moments describe raw scores, and a capped Gaussian is no Gaussian. For
    caps wide against the score spread (Gemma-2's 50 and 30) the cap is near the identity where
    the support lies; a tight cap flattens the top and widens the support, so the estimate may
    miss pages. It is an approximate selector either way; ``certified`` adds every page whose
    capped bound violates the certificate, so the output stays exact.

    ``row_start`` (int ``[B]``, optional; a left-padded batch): pages lying wholly below the
    start are never selected, forced or ranked (top-k fills its budget from the pages after it),
    and weigh nothing in the gaussian estimate. The page that straddles the start keeps its
    statistics (they also describe hidden rows: the estimate is approximate either way).
    """
    page_size, scale = check_bound_inputs(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes)
    batch, _, _, head_dim = q.shape
    kv_heads, num_pages = kmin.shape[1], kmin.shape[2]
    check_stats_buffers(kmin, kmax, kmean, km2, batch=batch, kv_heads=kv_heads, num_pages=num_pages,
                        head_dim=head_dim)
    alpha = check_alpha(alpha)
    if selector not in PAGE_SELECTORS:
        raise ValueError(f"selector must be one of {PAGE_SELECTORS}, got {selector!r}")
    if tau_estimate not in TAU_ESTIMATES:
        raise ValueError(f"tau_estimate must be one of {TAU_ESTIMATES}, got {tau_estimate!r}")
    check_int_arg("token_budget", token_budget, minimum=page_size)
    if not (isinstance(max_quantile, (int, float)) and 0.0 < max_quantile < 1.0):
        raise ValueError(f"max_quantile must be a float in (0, 1), got {max_quantile!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite float, got {margin!r}")
    for name, value in (("sink_pages", sink_pages), ("recent_pages", recent_pages), ("min_context", min_context)):
        check_int_arg(name, value, minimum=0)
    return select_pages_unchecked(
        q, kmin, kmax, kmean, km2, seqlens, page_size=page_size, alpha=alpha, scale=scale, selector=selector,
        token_budget=token_budget, max_quantile=max_quantile, margin=margin, tau_estimate=tau_estimate,
        sink_pages=sink_pages, recent_pages=recent_pages, min_context=min_context, alibi_slopes=alibi_slopes,
        softcap=check_softcap(softcap), row_start=check_row_start(row_start, batch, device=q.device))


def select_pages_unchecked(q, kmin, kmax, kmean, km2, seqlens, *, page_size, alpha, scale, selector, token_budget,
                           max_quantile, margin, tau_estimate, sink_pages, recent_pages, min_context,
                           alibi_slopes=None, softcap=0.0, row_start=None,
                           block_table=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_pages` for a caller that has validated its arguments (the step: its entry
    checked the tensors, ``EntmaxKVConfig`` the options). ``block_table``: per-block statistics
    ``[num_blocks, Hkv, D]`` gathered through it (``runtime/paged.py``); pages stay logical."""
    if block_table is not None:
        kmin, kmax, kmean, km2 = gather_stats(block_table, seqlens, page_size, kmin, kmax, kmean, km2)
    batch, kv_heads, num_pages = kmin.shape[:3]
    valid = valid_page_mask(seqlens, page_size, num_pages)[:, None, :]  # [B, 1, Np]
    forced = forced_page_mask(seqlens, page_size, num_pages, sink_pages, recent_pages)[:, None, :]
    if row_start is not None:
        valid = valid & pages_from_start(row_start, page_size, num_pages)[:, None, :]
        forced = forced & valid
    if selector == "dense":
        chosen = valid.expand(batch, kv_heads, num_pages)
    elif selector == "topk":
        bounds = quest_bounds_in(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes, compute_dtype(q), softcap)
        if row_start is not None:  # a hidden page neither ranks nor sets a head's best page
            bounds = torch.where(valid, bounds, float("-inf"))
        score = head_normalized_group_score(bounds, kv_heads)
        score = torch.where(forced, float("inf"), score)
        chosen = top_pages_lowest_id_ties(score, min(token_budget // page_size, num_pages))
    else:
        mixture = tau_estimate == "mixture" or (tau_estimate == "auto" and alibi_slopes is not None)
        keep = _gaussian_keep(q, kmean, km2, seqlens, page_size, alpha, scale, float(max_quantile),
                              float(margin), mixture, alibi_slopes, row_start)
        chosen = keep.reshape(batch, kv_heads, -1, num_pages).any(2)
    short = (seqlens < min_context)[:, None, None]
    chosen = (chosen | forced | short) & valid
    return compact_page_mask(chosen)
