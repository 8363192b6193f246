"""The eager public decode step: ``sparse_decode`` validates, then runs the shared step.

``sparse_decode`` checks its inputs once, builds the page statistics when none are given, and runs
:func:`~entmaxkv_compile.runtime.step.run_step` (select, attend, certify; in ``"certified"`` mode
add the violating pages, so the result equals full entmax) on the Triton kernels when they can
run on q's device and on the pure-torch references of the stage packages otherwise.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_decode_inputs, check_scale
from ..config import EntmaxKVConfig
from .stats.reference import KVPageStats
from .step import DecodeResult, implementation_for, run_step

__all__ = ["DecodeResult", "sparse_decode"]


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
