"""Stage 5, the reference: the support certificate of a selection and the bound of the mass it drops.

Pure torch, fixed-shape, no host sync: the CPU path of the ``entmaxkv::certify`` op and the oracle
of the Triton kernel in :mod:`.kernel` (same arguments, same results).

A left-padded batch (``run_step``'s ``row_start``): the certificate is about full entmax over
``[row_start, seqlens)``. The pages lying wholly below the start hold none of those tokens, so they
need no bound: the step drops them from every round's table after ``certify_pages`` (they may be
flagged there, and are never read). The page that straddles the start keeps its statistics, which
also cover the hidden rows before the start: its Quest bound is a max over more rows than are
attended, so it is still an upper bound of every attended score, only looser, and the argument
"a page left out has (alpha-1) u_p <= tau" stays sound. ``certify`` (``report_bound``) counts the
hidden pages among the unselected ones: its ``delta_bound`` is only looser.
"""

from __future__ import annotations

import torch

from ...checks import check_bound_inputs, check_page_table, check_softcap, check_stats_valid, check_tau
from ...config import check_alpha
from ...math.reference import entmax_beta
from ..select.reference import compact_page_mask, page_mask_from_indices, quest_bounds_in, valid_page_mask
from ..paged import gather_stats
from ..stats.reference import page_token_counts

__all__ = ["certificate_inputs_ok", "certified_heads", "certify", "certify_pages", "certify_unchecked"]


def _page_excess(q, kmin, kmax, seqlens, page_mask, tau, page_size, alpha, scale, alibi_slopes, softcap):
    """``((alpha-1) u_p - tau)`` ``[B, Hq, Npages]`` and the mask of unselected valid pages."""
    dtype = torch.float64 if torch.float64 in (q.dtype, tau.dtype) else torch.float32
    batch, q_heads = q.shape[:2]
    kv_heads, num_pages = kmin.shape[1], kmin.shape[2]
    bounds = quest_bounds_in(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes, dtype, softcap)
    excess = (alpha - 1.0) * bounds - tau.to(dtype)[..., None]
    selected = page_mask.repeat_interleave(q_heads // kv_heads, dim=1)
    unselected = ~selected & valid_page_mask(seqlens, page_size, num_pages)[:, None, :]
    return excess, unselected


def _certify_in(q, kmin, kmax, seqlens, page_mask, tau, page_size, alpha, scale, alibi_slopes, stats_valid=None,
                softcap=0.0):
    """``certified [B, Hq]`` and ``delta_bound [B, Hq]`` (compute dtype); see :func:`certify`."""
    excess, unselected = _page_excess(q, kmin, kmax, seqlens, page_mask, tau, page_size, alpha, scale, alibi_slopes,
                                      softcap)
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
    return finite & sound_rows(seqlens, num_pages * page_size, stats_valid)[:, None]


def sound_rows(seqlens: torch.Tensor, capacity: int, stats_valid: torch.Tensor | None) -> torch.Tensor:
    """bool ``[B]``: the length lies in ``[1, capacity]`` and the statistics (when told) are valid."""
    length = seqlens.to(torch.int64)
    sound = (length >= 1) & (length <= capacity)
    return sound if stats_valid is None else sound & stats_valid


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
    softcap: float = 0.0,
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

    With ``softcap > 0`` the scores are ``softcap * tanh(s / softcap)`` and ``u_p`` is the capped
    Quest bound: exact still, because the cap is increasing, so an upper bound of s maps to an
    upper bound of c.
    """
    page_size, scale = check_bound_inputs(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes)
    alpha = check_alpha(alpha)
    batch, kv_heads, num_pages, _ = kmin.shape
    check_page_table(page_indices, num_selected, batch=batch, kv_heads=kv_heads, num_pages=num_pages,
                     device=q.device)
    check_tau(tau, q)
    check_stats_valid(stats_valid, batch, q.device)
    return certify_unchecked(q, kmin, kmax, seqlens, page_indices, num_selected, tau, page_size=page_size,
                             alpha=alpha, scale=scale, alibi_slopes=alibi_slopes, stats_valid=stats_valid,
                             softcap=check_softcap(softcap))


def certify_unchecked(q, kmin, kmax, seqlens, page_indices, num_selected, tau, *, page_size, alpha, scale,
                      alibi_slopes=None, stats_valid=None, softcap=0.0,
                      block_table=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`certify` for a caller that has validated its arguments (the step); ``block_table``:
    per-block statistics gathered through it (``runtime/paged.py``)."""
    if block_table is not None:
        kmin, kmax = gather_stats(block_table, seqlens, page_size, kmin, kmax)
    page_mask = page_mask_from_indices(page_indices, num_selected, kmin.shape[2])
    certified, delta = _certify_in(q, kmin, kmax, seqlens, page_mask, tau, page_size, alpha, scale, alibi_slopes,
                                   stats_valid, softcap)
    return certified, delta.to(torch.float32)


def certify_pages(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    seqlens: torch.Tensor,
    page_indices: torch.Tensor,
    num_selected: torch.Tensor,
    tau: torch.Tensor,
    read_all: torch.Tensor,
    *,
    page_size: int,
    alpha: float,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pages a certified round must read: ``(page_indices, num_selected, bounds_finite)``.

    A valid page is read when it is among the first ``num_selected`` of ``page_indices`` (the
    pages already selected, as ``select_pages`` returns them), when its sequence is marked ``read_all`` (bool ``[B]``: statistics that
    bound nothing, or a step that reads everything anyway), or when some query head of its group
    has ``(alpha-1) u_p > tau`` (``u_p`` the Quest bound; ``tau`` float32 ``[B, Hq]``, a lower
    bound of the exact threshold); a NaN bound is read too. Every page left out then has
    ``(alpha-1) u_p <= tau`` for every head, so no token of it is in the full-entmax support.
    ``bounds_finite`` (bool ``[B, Hq]``) is False where a bound of a valid page of a sequence that
    is not read-all is not finite: the certificate does not rest on such a bound. With
    ``softcap > 0``, ``u_p`` is the capped bound (exact: the cap is increasing, so an upper bound
    of s maps to an upper bound of c). Trusts its caller (the step); the oracle of the
    ``triton_certify_pages`` kernel. ``block_table``: per-block statistics gathered through it
    (``runtime/paged.py``).
    """
    if block_table is not None:
        kmin, kmax = gather_stats(block_table, seqlens, page_size, kmin, kmax)
    dtype = torch.float64 if torch.float64 in (q.dtype, tau.dtype) else torch.float32
    batch, q_heads = q.shape[:2]
    kv_heads, num_pages = kmin.shape[1], kmin.shape[2]
    bounds = quest_bounds_in(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes, dtype, softcap)
    bounded = valid_page_mask(seqlens, page_size, num_pages)[:, None, :] & ~read_all[:, None, None]
    violates = bounded & ~((alpha - 1.0) * bounds <= tau.to(dtype)[..., None])
    hit = violates.reshape(batch, kv_heads, q_heads // kv_heads, num_pages).any(2)
    valid = valid_page_mask(seqlens, page_size, num_pages)[:, None, :]
    page_mask = page_mask_from_indices(page_indices, num_selected, num_pages)
    read = valid & (page_mask | read_all[:, None, None] | hit)
    finite = ~(bounded & ~torch.isfinite(bounds)).any(-1)
    page_indices, num_selected = compact_page_mask(read)
    return page_indices, num_selected, finite


def certified_heads(tau: torch.Tensor, bounds_finite: torch.Tensor, seqlens: torch.Tensor,
                    stats_ok: torch.Tensor, *, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(certified bool [B, Hq], delta_bound float32 [B, Hq])`` after a certified round.

    Every page left out of the round has ``(alpha-1) u_p <= tau``, so the output is full entmax
    when that argument rests on sound inputs: ``bounds_finite`` and ``tau`` finite, the length in
    ``[1, capacity]`` and ``stats_ok`` (bool ``[B]``). Where certified the dropped mass is 0, else
    the trivial bound 1.
    """
    certified = bounds_finite & torch.isfinite(tau) & sound_rows(seqlens, capacity, stats_ok)[:, None]
    return certified, torch.where(certified, 0.0, 1.0).to(torch.float32)
