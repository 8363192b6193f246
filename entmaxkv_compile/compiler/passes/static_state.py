"""Page statistics as static state: one :class:`KVPageStats` per cache buffer, allocated once.

Rewritten graphs take the statistics as extra inputs; the backend's wrapper looks them up here by
the identity of the cache tensor passed at run time. So a new cache (a new ``StaticCache`` for the
next ``generate()`` call) gets its own statistics, the prefill graph and the decode graph of one
cache share theirs, and the addresses never change (the buffers are marked static, so CUDA graphs
in ``mode="reduce-overhead"`` do not re-record or copy them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ...runtime.stats.paged import PagedKVStats
from ...runtime.stats.reference import KVPageStats, resolve_moment_dtype


class StatsRegistry:
    """Maps a K cache tensor (by identity, weakly), a page size and a moment dtype to its stats.

    A K cache that is a part ``kv[part]`` of a fused K/V buffer is keyed on the buffer and ``part``:
    the view is a new Python object at every call, the buffer is not. A page pool read through a
    block table gets :class:`PagedKVStats` (per physical block), keyed on the pool.
    """

    def __init__(self) -> None:
        self._stats: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, k_cache: torch.Tensor, page_size: int, moment_dtype: str = "float32",
            part: Optional[int] = None,
            paged: Optional[tuple[int, int]] = None) -> tuple[KVPageStats | PagedKVStats, bool]:
        """``(stats, created)``: the statistics of ``k_cache`` (of ``k_cache[part]`` when ``part`` is
        given: a fused K/V buffer), allocating them on first use.

        ``moment_dtype`` is :class:`~entmaxkv_compile.config.EntmaxKVConfig`'s (``"float32"`` or
        ``"cache"``): how kmean/km2 are stored. ``paged``: ``k_cache`` is a page pool
        ``[num_blocks, P, Hkv, D]`` read through block tables of shape ``(batch, max_pages)``.
        """
        per_cache = self._stats.get(k_cache)
        if per_cache is None:
            per_cache = {}
            self._stats[k_cache] = per_cache
        key = _key(page_size, moment_dtype, part, paged)
        stats = per_cache.get(key)
        if stats is not None:
            return stats, False
        if part is not None:
            k_cache = k_cache[part]
        moments = resolve_moment_dtype(moment_dtype, k_cache.dtype)
        if paged is not None:
            num_blocks, _, kv_heads, head_dim = k_cache.shape
            stats = PagedKVStats.allocate(num_blocks, kv_heads, head_dim, batch=paged[0], max_pages=paged[1],
                                          page_size=page_size, dtype=k_cache.dtype, device=k_cache.device,
                                          moment_dtype=moments)
        else:
            batch, kv_heads, max_seqlen, head_dim = k_cache.shape
            stats = KVPageStats.allocate(batch, kv_heads, max_seqlen, head_dim, page_size, dtype=k_cache.dtype,
                                         device=k_cache.device, moment_dtype=moments)
        for buffer in (*stats.buffers(), *stats.sequence_state()):
            torch._dynamo.mark_static_address(buffer, guard=False)
        per_cache[key] = stats
        return stats, True

    def lookup(self, k_cache: torch.Tensor, page_size: int, moment_dtype: str = "float32",
               part: Optional[int] = None,
               paged: Optional[tuple[int, int]] = None) -> KVPageStats | PagedKVStats | None:
        """The statistics of ``k_cache`` (or of its ``part``, or of a pool) if they exist (no allocation)."""
        return (self._stats.get(k_cache) or {}).get(_key(page_size, moment_dtype, part, paged))


def _key(page_size: int, moment_dtype: str, part: Optional[int], paged: Optional[tuple[int, int]]) -> tuple:
    key: tuple = (page_size, moment_dtype) if part is None else (page_size, moment_dtype, part)
    return key if paged is None else (*key, "paged", *paged)


#: The process-wide registry used by the backend (statistics follow the cache, not the graph).
STATS = StatsRegistry()
