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

from ...runtime.stats.reference import KVPageStats, resolve_moment_dtype


class StatsRegistry:
    """Maps a K cache tensor (by identity, weakly), a page size and a moment dtype to its stats.

    A K cache that is a part ``kv[part]`` of a fused K/V buffer is keyed on the buffer and ``part``:
    the view is a new Python object at every call, the buffer is not.
    """

    def __init__(self) -> None:
        self._stats: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, k_cache: torch.Tensor, page_size: int, moment_dtype: str = "float32",
            part: Optional[int] = None) -> tuple[KVPageStats, bool]:
        """``(stats, created)``: the statistics of ``k_cache`` (of ``k_cache[part]`` when ``part`` is
        given: a fused K/V buffer), allocating them on first use.

        ``moment_dtype`` is :class:`~entmaxkv_compile.config.EntmaxKVConfig`'s (``"float32"`` or
        ``"cache"``): how kmean/km2 are stored.
        """
        per_cache = self._stats.get(k_cache)
        if per_cache is None:
            per_cache = {}
            self._stats[k_cache] = per_cache
        key = (page_size, moment_dtype) if part is None else (page_size, moment_dtype, part)
        stats = per_cache.get(key)
        if stats is not None:
            return stats, False
        if part is not None:
            k_cache = k_cache[part]
        batch, kv_heads, max_seqlen, head_dim = k_cache.shape
        moments = resolve_moment_dtype(moment_dtype, k_cache.dtype)
        stats = KVPageStats.allocate(batch, kv_heads, max_seqlen, head_dim, page_size, dtype=k_cache.dtype,
                                     device=k_cache.device, moment_dtype=moments)
        for buffer in (*stats.buffers(), *stats.sequence_state()):
            torch._dynamo.mark_static_address(buffer, guard=False)
        per_cache[key] = stats
        return stats, True

    def lookup(self, k_cache: torch.Tensor, page_size: int, moment_dtype: str = "float32",
               part: Optional[int] = None) -> KVPageStats | None:
        """The statistics of ``k_cache`` (or of its ``part``) if they exist (no allocation)."""
        key = (page_size, moment_dtype) if part is None else (page_size, moment_dtype, part)
        return (self._stats.get(k_cache) or {}).get(key)


#: The process-wide registry used by the backend (statistics follow the cache, not the graph).
STATS = StatsRegistry()
