"""The logit soft-cap inside the Triton kernels: ``cap * tanh(x / cap)`` on finite scores.

Shared by the K pass of the decode (``attend/decode_kernels.py``) and the Quest bounds of the
selection and the certificate (``select/select_kernels.py``), so that the kernels cap exactly as
``math.softcap.apply_softcap`` does. tanh is written with ``exp2`` (Triton has no portable tanh
across the versions we support): a short odd series near 0, where ``(1 - e^-2|x|) / (1 + e^-2|x|)``
would lose relative precision, that quotient elsewhere (it saturates to 1, never NaN).
Non-finite scores pass through: ``-inf`` is the mask, ``+inf``/NaN keep their edge-case meaning.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def soft_cap(x, cap):
    """``cap * tanh(x / cap)`` where ``x`` is finite, ``x`` elsewhere (``cap > 0``, float32)."""
    y = x / cap
    a = tl.abs(y)
    a_safe = tl.where(a < float("inf"), a, 0.0)  # keep inf/NaN out of the arithmetic
    t = tl.exp2(-2.8853900817779268 * a_safe)  # e^(-2a)
    y2 = a_safe * a_safe
    small = a_safe * (1.0 - y2 * (1.0 / 3.0 - y2 * (2.0 / 15.0)))
    mag = tl.where(a_safe < 0.125, small, (1.0 - t) / (1.0 + t))
    capped = cap * tl.where(y < 0, -mag, mag)
    return tl.where(a < float("inf"), capped, x)
