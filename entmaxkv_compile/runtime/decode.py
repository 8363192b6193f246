"""The eager public decode step: ``sparse_decode`` validates, then runs the shared step.

``sparse_decode`` checks its inputs once, builds the page statistics when none are given, and runs
:func:`~entmaxkv_compile.runtime.step.run_step` (select, attend, certify; in ``"certified"`` mode
add the violating pages, so the result equals full entmax) on the Triton kernels when they can
run on q's device and on the pure-torch references of the stage packages otherwise.
"""

from __future__ import annotations


import torch

from ..checks import check_decode_inputs, check_row_start
from ..config import EntmaxKVConfig
from .sketch.reference import KeySketch
from .paged import check_paged_decode_inputs, check_table_values
from .stats.paged import PagedKVStats
from .stats.reference import KVPageStats
from .decoder import Decoder
from .step import DecodeResult

__all__ = ["DecodeResult", "sparse_decode"]


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    config: EntmaxKVConfig | None = None,
    stats: KVPageStats | PagedKVStats | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    check_values: bool = True,
    softcap: float = 0.0,
    row_start: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> DecodeResult:
    """One support-aware entmax decode step (the eager public API).

    Validates the inputs (``check_values=False`` skips the checks that synchronise), builds the
    page statistics from the cache when ``stats`` is None, selects pages with ``config.selector``
    (alpha defaults to 1.5, ``scale`` to ``1/sqrt(D)``), decodes exactly over them and certifies,
    through a :class:`~entmaxkv_compile.runtime.decoder.Decoder` planned for these inputs (the Triton
    kernels when they can run on q's device, the stage references otherwise). ``"certified"`` output
    equals full entmax. The checks and the plan cost host time on every call (with the default
    ``check_values=True``, also a host sync): a decode loop should build one ``Decoder`` and call
    its ``run``, which validates nothing and replays a CUDA graph on a GPU. ``softcap > 0``:
    entmax over ``softcap * tanh(s / softcap)`` (Gemma-2's logit soft-capping; not with the key sketch).
    ``row_start`` (int ``[B]``, optional): each sequence attends ``[row_start, seqlens)`` only
    (a left-padded batch; not with the key sketch).
    ``block_table`` (int32 ``[B, max_pages]``, optional): a paged cache (``runtime/paged.py``):
    ``k_cache``/``v_cache`` are page pools ``[num_blocks, page_size, Hkv, D]`` (vLLM /
    FlashInfer NHD; FlashInfer HND as ``pool.transpose(1, 2)``), ``stats`` a
    :class:`~entmaxkv_compile.runtime.stats.paged.PagedKVStats` (built from the pool when None);
    not with the key sketch.
    """
    if block_table is not None:
        return _paged_decode(q, k_cache, v_cache, seqlens, block_table, config, stats, alibi_slopes, scale,
                             softcap=softcap, row_start=row_start, check_values=check_values)
    check_decode_inputs(q, k_cache, v_cache, seqlens, alibi_slopes, check_values=check_values)
    check_row_start(row_start, q.shape[0], device=q.device)
    if config is None:
        config = EntmaxKVConfig()
    elif not isinstance(config, EntmaxKVConfig):
        raise TypeError(f"config must be an EntmaxKVConfig or None, got {type(config).__name__}")
    if stats is None:
        stats = KVPageStats.from_cache(k_cache, seqlens, config.page_size, check_values=False)
    sketch = None
    if config.keeps_sketch:  # rebuilt per call, like stats=None
        sketch = KeySketch.from_cache(k_cache, seqlens, check_values=False)
    decoder = Decoder.for_cache(k_cache, q.shape[1], config, scale=scale, alibi_slopes=alibi_slopes,
                                stats=stats, sketch=sketch, cuda_graph=False, softcap=softcap)
    return decoder.run(q, k_cache, v_cache, seqlens, row_start=row_start)


def _paged_decode(q, k_pool, v_pool, seqlens, block_table, config, stats, alibi_slopes, scale, *, softcap,
                  row_start, check_values) -> DecodeResult:
    """:func:`sparse_decode` over page pools read through ``block_table``."""
    if config is None:
        config = EntmaxKVConfig()
    elif not isinstance(config, EntmaxKVConfig):
        raise TypeError(f"config must be an EntmaxKVConfig or None, got {type(config).__name__}")
    check_paged_decode_inputs(q, k_pool, v_pool, seqlens, block_table, page_size=config.page_size)
    if check_values:
        check_table_values(block_table, seqlens, config.page_size, k_pool.shape[0])
    check_row_start(row_start, q.shape[0], device=q.device)
    batch, q_heads, _, head_dim = q.shape
    num_blocks, page_size, kv_heads, _ = k_pool.shape
    max_pages = block_table.shape[1]
    if stats is None:
        moments = k_pool.dtype if config.moment_dtype == "cache" else None
        stats = PagedKVStats.allocate(num_blocks, kv_heads, head_dim, batch=batch, max_pages=max_pages,
                                      page_size=page_size, dtype=k_pool.dtype, device=k_pool.device,
                                      moment_dtype=moments)
        stats.prefill(k_pool, seqlens, block_table)
    decoder = Decoder(config, batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                      capacity=max_pages * page_size, dtype=q.dtype, device=q.device, scale=scale,
                      alibi_slopes=alibi_slopes, stats=stats, cuda_graph=False, softcap=softcap,
                      num_blocks=num_blocks)
    return decoder.run(q, k_pool, v_pool, seqlens, row_start=row_start, block_table=block_table)
