"""Logit soft-capping, ``c = cap * tanh(s / cap)`` (Gemma-2 style), applied to attention scores
before entmax.

The cap is strictly increasing in ``s``, so an upper bound of a raw score maps to an upper bound
of its capped score: every page bound of the runtime stays a bound when it is passed through
:func:`apply_softcap`, and the exact threshold is solved on the capped scores. ``softcap = 0``
means no cap (the identity). Non-finite scores pass through unchanged: ``-inf`` is the mask (an
empty page must stay empty) and ``+inf``/NaN keep their edge-case meaning (docs/EDGE_INPUTS.md).
"""

from __future__ import annotations

import torch

__all__ = ["apply_softcap"]


def apply_softcap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` where ``scores`` is finite (the identity when
    ``softcap == 0``); ``softcap`` is a validated float >= 0 (``checks.check_softcap``)."""
    if not softcap:
        return scores
    return torch.where(torch.isfinite(scores), softcap * torch.tanh(scores / softcap), scores)
