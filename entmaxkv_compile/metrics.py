"""Quality metrics of a sparse decode against exact dense entmax attention (the ground truth).

``full_entmax_decode`` recomputes dense entmax attention independently of the paged path (per
query head, through ``reference.entmax``); the other functions compare a selection or an output
with it. Metrics are for tests and benchmarks, not for the decode step itself.
"""

from __future__ import annotations

import torch

from .checks import check_decode_inputs, check_scale, check_softcap, check_tensor
from .config import check_alpha
from .math.reference import entmax
from .math.softcap import apply_softcap

__all__ = ["dropped_mass", "full_entmax_decode", "relative_error", "support_recall"]


def full_entmax_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    alpha: float,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact dense entmax attention over the first ``seqlens[b]`` tokens (of the soft-capped
    scores ``softcap * tanh(s / softcap)`` when ``softcap > 0``).

    Returns ``out [B, Hq, 1, D]`` and ``probs [B, Hq, Nmax]`` (zeros past each sequence), both in
    float64 for float64 inputs and float32 otherwise (more precise than q's dtype on purpose: this
    is the reference others are measured against).
    """
    check_decode_inputs(q, k_cache, v_cache, seqlens, alibi_slopes)
    alpha, scale, softcap = check_alpha(alpha), check_scale(scale), check_softcap(softcap)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k_cache.shape[1]
    k = k_cache.to(dtype).repeat_interleave(group, dim=1)  # [B, Hq, N, D]
    v = v_cache.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].to(dtype), k) * scale
    positions = torch.arange(k.shape[2], device=q.device)
    last = seqlens.to(torch.int64)[:, None] - 1
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(dtype)[None, :, None] * (positions[None, :] - last).to(dtype)[:, None, :]
    scores = apply_softcap(scores, softcap)
    valid = (positions[None, :] <= last)[:, None, :].expand_as(scores)
    probs = entmax(torch.where(valid, scores, float("-inf")), alpha=alpha, dim=-1, mask=valid)
    probs = torch.where(valid, probs, 0.0)
    out = torch.einsum("bhn,bhnd->bhd", probs, torch.where(valid[..., None], v, 0.0))
    return out[:, :, None, :], probs


def _expand_token_mask(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-KV-head token mask ``[B, Hkv, N]`` to the query heads of ``probs [B, Hq, N]``."""
    check_tensor("selected_token_mask", selected)
    if selected.dtype != torch.bool or selected.dim() != 3:
        raise ValueError(f"selected_token_mask must be a bool [B, H, N] tensor, got {selected.dtype} "
                         f"{tuple(selected.shape)}")
    batch, q_heads, tokens = probs.shape
    if selected.shape[0] != batch or selected.shape[2] != tokens or q_heads % selected.shape[1]:
        raise ValueError(f"selected_token_mask {tuple(selected.shape)} does not match p_full "
                         f"{tuple(probs.shape)} ([B, Hq or Hkv, N])")
    return selected.repeat_interleave(q_heads // selected.shape[1], dim=1)


def dropped_mass(p_full: torch.Tensor, selected_token_mask: torch.Tensor) -> torch.Tensor:
    """Full-entmax probability mass on tokens a selection left out: ``[B, Hq]``.

    ``p_full`` ``[B, Hq, N]`` (e.g. from :func:`full_entmax_decode`); ``selected_token_mask`` bool
    ``[B, Hq, N]`` or per KV head ``[B, Hkv, N]`` (as from ``selection.selected_token_mask``).
    Zero means the selection holds the whole support, so the sparse output is exact.
    """
    selected = _expand_token_mask(p_full, selected_token_mask)
    return torch.where(selected, 0.0, p_full).sum(-1)


def support_recall(p_full: torch.Tensor, selected_token_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the full-entmax support (tokens with ``p > 0``) that was selected: ``[B, Hq]``."""
    selected = _expand_token_mask(p_full, selected_token_mask)
    support = p_full > 0
    hits = (support & selected).sum(-1).to(p_full.dtype)
    return hits / support.sum(-1).clamp(min=1).to(p_full.dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||out - ref||_2 / ||ref||_2`` over the whole tensors, in float64 (a 0-dim tensor).

    A zero ``ref`` gives the absolute error norm instead of dividing by zero.
    """
    check_tensor("out", out)
    check_tensor("ref", ref)
    if out.shape != ref.shape:
        raise ValueError(f"out must have ref's shape {tuple(ref.shape)}, got {tuple(out.shape)}")
    diff = (out.double() - ref.double()).norm()
    norm = ref.double().norm()
    return diff / torch.where(norm > 0, norm, 1.0)
