"""Stage 4, the reference: exact entmax attention over the valid tokens of the selected pages.

Pure torch, fixed-shape, no host sync: the CPU path of the ``entmaxkv::paged_decode`` op and the
oracle of the Triton kernel in :mod:`.kernel` (same arguments, same results).
"""

from __future__ import annotations

import torch

from ...checks import check_attend_inputs, check_page_table, check_row_start, check_softcap, num_pages_for
from ...math.reference import entmax_probs_and_threshold
from ...math.softcap import apply_softcap
from ..paged import gather_cache
from ..select.reference import compute_dtype, page_mask_from_indices

__all__ = ["paged_decode", "paged_decode_unchecked"]


def _decode_in(q, k_cache, v_cache, seqlens, page_mask, page_size, alpha, scale, alibi_slopes, softcap=0.0,
               row_start=None):
    """Exact entmax over the tokens of ``page_mask`` (bool ``[B, Hkv, Npages]``).

    Returns ``out`` in q's dtype and ``tau [B, Hq]`` in the compute dtype. Scores of all rows are
    computed, then masked (rows below ``row_start[b]`` too, when given); the solve is relative to each head's max score (shift-invariant, see
    ``math.reference``). Lengths are clamped to ``[0, Nmax]``. A V row reaches the output only
    when it is in the support of some query head of its KV group (as in the kernels, which read V
    only there), so garbage in unattended rows cannot leak through ``0 * NaN``. Edge cases
    (docs/EDGE_INPUTS.md): a head whose attended scores hold a NaN or ``+inf`` gets NaN ``out``
    and ``tau``; a head with nothing to attend gets ``out = 0`` and ``tau = +inf``.
    """
    dtype = compute_dtype(q)
    batch, q_heads, _, head_dim = q.shape
    kv_heads, max_seqlen = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    rows = torch.arange(max_seqlen, device=q.device)
    inside = rows[None, :] < seqlens.to(torch.int64)[:, None]  # [B, N]
    if row_start is not None:  # a hidden prefix (left padding): never attended
        inside = inside & (rows[None, :] >= row_start.to(torch.int64)[:, None])
    tokens = page_mask.repeat_interleave(page_size, dim=-1)[..., :max_seqlen] & inside[:, None, :]
    mask = tokens[:, :, None, :]  # [B, Hkv, 1, N], shared by the query group

    qg = q.reshape(batch, kv_heads, group, head_dim).to(dtype)
    scores = (qg @ k_cache.to(dtype).transpose(-1, -2)) * scale  # [B, Hkv, G, N]
    if alibi_slopes is not None:
        rel = (rows[None, :] - (seqlens.to(torch.int64)[:, None] - 1)).to(dtype)  # [B, N]
        scores = scores + alibi_slopes.to(dtype).reshape(1, kv_heads, group, 1) * rel[:, None, None, :]
    scores = apply_softcap(scores, softcap)  # entmax over the capped scores (0 = no cap)
    p, tau = entmax_probs_and_threshold(scores, alpha, dim=-1, mask=mask.expand_as(scores))
    live = (p > 0).any(2)  # [B, Hkv, N]: in the support of some head of the group
    v = torch.where(live[..., None], v_cache.to(dtype), 0.0)
    out = p @ v
    return out.reshape(batch, q_heads, 1, head_dim).to(q.dtype), tau.to(dtype).reshape(batch, q_heads)


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
    softcap: float = 0.0,
    row_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact entmax attention over the valid tokens of the selected pages.

    Query head ``h`` attends the pages selected for KV head ``h // G``; ``tau`` is solved exactly
    on those tokens (float32, float64 for float64 inputs) and the output is divided by ``sum p``.
    Returns ``out [B, Hq, 1, D]`` in q's dtype and ``tau`` float32 ``[B, Hq]``. A KV head with no
    selected valid token has nothing to attend: its rows come out NaN (``select_pages`` always
    selects the last valid page, so this only happens with hand-made page tables). With
    ``softcap > 0`` the scores ``s = scale q.k (+ ALiBi)`` are capped to ``softcap * tanh(s /
    softcap)`` first: tau and the output are those of entmax over the capped scores.
    ``row_start`` (int ``[B]``, optional): tokens at positions below ``row_start[b]`` are not
    attended (a left-padded prefix), as those at or past ``seqlens[b]`` are not; ALiBi distances
    stay measured from ``seqlens[b] - 1``.
    """
    page_size, alpha, scale = check_attend_inputs(q, k_cache, v_cache, seqlens, page_size, alpha, scale, alibi_slopes)
    batch, kv_heads, max_seqlen, _ = k_cache.shape
    num_pages = num_pages_for(max_seqlen, page_size)
    check_page_table(page_indices, num_selected, batch=batch, kv_heads=kv_heads, num_pages=num_pages,
                     device=q.device)
    check_row_start(row_start, batch, device=q.device)
    return paged_decode_unchecked(q, k_cache, v_cache, seqlens, page_indices, num_selected, page_size=page_size,
                                  alpha=alpha, scale=scale, alibi_slopes=alibi_slopes,
                                  softcap=check_softcap(softcap), row_start=row_start)


def paged_decode_unchecked(q, k_cache, v_cache, seqlens, page_indices, num_selected, *, page_size, alpha, scale,
                           alibi_slopes=None, softcap=0.0, row_start=None,
                           block_table=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`paged_decode` for a caller that has validated its arguments (the step).
    ``block_table``: the caches are page pools read through it (``runtime/paged.py``): gathered
    into the contiguous cache they describe first."""
    if block_table is not None:
        k_cache = gather_cache(k_cache, block_table, seqlens, page_size)
        v_cache = gather_cache(v_cache, block_table, seqlens, page_size)
    num_pages = num_pages_for(k_cache.shape[2], page_size)
    page_mask = page_mask_from_indices(page_indices, num_selected, num_pages)
    out, tau = _decode_in(q, k_cache, v_cache, seqlens, page_mask, page_size, alpha, scale, alibi_slopes, softcap,
                          row_start)
    return out, tau.to(torch.float32)


def decode_verdict(tau: torch.Tensor, read_all: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(certified, delta_bound)`` that a decode proves on its own, from its ``tau`` ``[B, Hq]``.

    A decode that read every valid page (``read_all``) is full entmax wherever tau is finite
    (NaN marks a poisoned head, +inf a head with nothing to attend): certified there, with no
    mass left out. Otherwise the decode alone proves nothing (delta 1: all of the mass may lie
    in the pages it did not read); the certified rounds and the bounds decide instead.
    """
    certified = (tau < float("inf")) & bool(read_all)
    return certified, torch.where(certified, 0.0, 1.0)


def paged_decode_verdict_unchecked(q, k_cache, v_cache, seqlens, page_indices, num_selected, *, read_all=False,
                                   **geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`paged_decode_unchecked` plus :func:`decode_verdict`: ``(out, tau, certified,
    delta_bound)``, as the kernels' ``paged_decode_verdict``."""
    out, tau = paged_decode_unchecked(q, k_cache, v_cache, seqlens, page_indices, num_selected, **geometry)
    return (out, tau, *decode_verdict(tau, read_all))
