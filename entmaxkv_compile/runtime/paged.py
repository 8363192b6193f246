"""A paged KV cache addressed by a block table (the vLLM / FlashInfer layout).

Layout (one attention layer):

* ``k_pool``, ``v_pool``: ``[num_blocks, page_size, Hkv, D]``, one physical block of
  ``page_size`` tokens per entry. That is vLLM's flash-attention layout (per K and V) and
  FlashInfer's ``NHD`` layout. Any strides are accepted, so FlashInfer's ``HND`` storage
  ``[num_blocks, Hkv, page_size, D]`` is passed as its view ``pool.transpose(1, 2)``.
* ``block_table``: int32 ``[B, max_pages]``; logical page ``p`` of sequence ``b`` (tokens
  ``[p*P, (p+1)*P)``) lives in physical block ``block_table[b, p]``. Entries at or past a row's
  last page (``ceil(seqlens[b] / P)``) may hold anything (``-1``, stale ids): they are never read.
* ``seqlens``: int ``[B]``, at most ``max_pages * P``.
* page statistics (``kmin``/``kmax``/``kmean``/``km2``) are kept per *physical* block:
  ``[num_blocks, Hkv, D]``.

The block size must equal the config's page size: a statistic describes one page, and one page
is one block. Page indices in a selection stay *logical* (``0 .. max_pages-1`` of the row); a
kernel translates ``(b, page)`` to ``block_table[b, page]`` only where it reads K, V or a
statistic, under its constexpr ``HAS_TABLE`` flag (off, the contiguous path compiles as before);
the K pass reads the selected pages' blocks, gathered before its launch (:func:`selected_blocks`).

Prefix sharing: a block listed by several sequences (vLLM's prefix caching) is fine, because a
block's statistics are a function of its content. Two rows that prefill a shared block write the
same values, provided the block is full in both (vLLM shares only full blocks). An append must
never write into a shared block: the serving engine copies a block on write before a sequence
appends to it (vLLM does); appending in place would change the other sequence's keys and
statistics alike.

The contiguous cache ``[B, Hkv, Nmax, D]`` is the identity table over a pool holding one block
per ``(b, page)`` (:func:`pool_from_cache` builds that pool, a copy).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "cache_geometry",
    "check_block_table",
    "check_paged_bound_inputs",
    "check_paged_decode_inputs",
    "check_pool",
    "check_pool_stats",
    "check_table_values",
    "gather_cache",
    "gather_stats",
    "logical_pages",
    "physical_blocks",
    "pool_from_cache",
    "pool_stats_strides",
    "selected_blocks",
    "table_args",
]


def check_pool(name: str, pool: object, page_size: int) -> torch.Tensor:
    """A K or V page pool ``[num_blocks, page_size, Hkv, D]`` (any strides) whose block size is
    ``page_size``; returns it."""
    if not isinstance(pool, torch.Tensor) or pool.dim() != 4:
        raise ValueError(f"{name} must be a page pool tensor [num_blocks, page_size, Hkv, D], got "
                         f"{type(pool).__name__ if not isinstance(pool, torch.Tensor) else tuple(pool.shape)}")
    if pool.shape[1] != page_size:
        raise ValueError(f"{name}'s block size ({pool.shape[1]}, dim 1 of [num_blocks, page_size, Hkv, D]) must "
                         f"equal the config's page_size ({page_size})")
    if pool.shape[0] * page_size >= 2**31:  # the V pass keeps physical rows as int32
        raise ValueError(f"{name} holds {pool.shape[0]} blocks of {page_size} rows: at most 2**31 - 1 rows "
                         "are supported")
    return pool


def check_block_table(block_table: object, batch: int, *, device: torch.device) -> torch.Tensor:
    """int32 ``[B, max_pages]`` on ``device``; returns it. Its values are not read here."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise ValueError(f"block_table must be an int32 tensor [B, max_pages], got "
                         f"{tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else block_table!r}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape [B={batch}, max_pages >= 1], got {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on {device}, got {block_table.device}")
    return block_table


def check_paged_decode_inputs(q: object, k_pool: object, v_pool: object, seqlens: object,
                              block_table: object, *, page_size: int) -> None:
    """A decode step's query, pools, lengths and table agree: ``q [B, Hq, 1, D]`` with ``Hq`` a
    multiple of the pools' ``Hkv``, K and V pools of one shape, dtype and device (q's), int
    ``seqlens [B]`` and an int32 ``block_table [B, max_pages]`` there too."""
    check_pool("k_pool", k_pool, page_size)
    check_pool("v_pool", v_pool, page_size)
    if tuple(v_pool.shape) != tuple(k_pool.shape) or v_pool.dtype != k_pool.dtype or v_pool.device != k_pool.device:
        raise ValueError(f"v_pool must match k_pool ({tuple(k_pool.shape)}, {k_pool.dtype}, {k_pool.device}), got "
                         f"({tuple(v_pool.shape)}, {v_pool.dtype}, {v_pool.device})")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] != 1:
        raise ValueError("q must be a [B, Hq, 1, D] tensor")
    kv_heads, dim = k_pool.shape[2], k_pool.shape[3]
    if q.shape[3] != dim or q.shape[1] % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} must have head dim {dim} and a multiple of the pool's "
                         f"{kv_heads} KV heads")
    if q.dtype != k_pool.dtype or q.device != k_pool.device:
        raise ValueError(f"q must have the pools' dtype and device ({k_pool.dtype}, {k_pool.device}), got "
                         f"({q.dtype}, {q.device})")
    if not isinstance(seqlens, torch.Tensor) or tuple(seqlens.shape) != (q.shape[0],) \
            or seqlens.dtype not in (torch.int32, torch.int64) or seqlens.device != q.device:
        raise ValueError(f"seqlens must be an int32/int64 tensor [B={q.shape[0]}] on {q.device}")
    check_block_table(block_table, q.shape[0], device=q.device)


def check_pool_stats(block_table: torch.Tensor, kv_heads: int, head_dim: int,
                     *stats: Optional[torch.Tensor]) -> int:
    """Per-block statistics ``[num_blocks, Hkv, D]`` of one shape and device (the table's);
    returns ``num_blocks``."""
    shape = None
    for i, stat in enumerate(stats):
        if stat is None:
            continue
        if not isinstance(stat, torch.Tensor) or stat.dim() != 3 or stat.shape[1:] != (kv_heads, head_dim):
            raise ValueError(f"with a block_table the page statistics are per physical block, "
                             f"[num_blocks, Hkv={kv_heads}, D={head_dim}]; statistic {i} has shape "
                             f"{tuple(stat.shape) if isinstance(stat, torch.Tensor) else stat!r}")
        if shape is not None and tuple(stat.shape) != shape:
            raise ValueError(f"the page statistics must share one shape {shape}, got {tuple(stat.shape)}")
        if stat.device != block_table.device:
            raise ValueError(f"the page statistics must be on the block_table's device {block_table.device}")
        shape = tuple(stat.shape)
    return 0 if shape is None else shape[0]


def check_paged_bound_inputs(q: object, block_table: object, *stats: Optional[torch.Tensor]) -> None:
    """The scoring launchers' inputs with a table: ``q [B, Hq, 1, D]``, the table, and per-block
    statistics ``[num_blocks, Hkv, D]`` (``Hq`` a multiple of ``Hkv``) on q's device."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] != 1:
        raise ValueError("q must be a [B, Hq, 1, D] tensor")
    check_block_table(block_table, q.shape[0], device=q.device)
    kmin = stats[0]
    if not isinstance(kmin, torch.Tensor) or kmin.dim() != 3:
        raise ValueError("with a block_table, kmin must be per physical block, [num_blocks, Hkv, D]")
    if q.shape[1] % kmin.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of the statistics' {kmin.shape[1]} KV heads")
    check_pool_stats(block_table, kmin.shape[1], q.shape[3], *stats)


def check_table_values(block_table: torch.Tensor, seqlens: torch.Tensor, page_size: int, num_blocks: int) -> None:
    """The values a paged step reads (a host sync: the public entry's ``check_values``): every
    length in ``[1, max_pages * P]`` and every entry of a row's pages a block id in
    ``[0, num_blocks)`` (entries past a row's pages are not looked at)."""
    capacity = block_table.shape[1] * page_size
    length = seqlens.to(torch.int64)
    if bool(((length < 1) | (length > capacity)).any()):
        raise ValueError(f"seqlens must lie in [1, max_pages * page_size = {capacity}], got {seqlens.tolist()}")
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size < length[:, None]
    ids = block_table.to(torch.int64)
    bad = used & ((ids < 0) | (ids >= num_blocks))
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {p}] = {int(ids[b, p])} must be a block id in [0, {num_blocks}) "
                         f"(page {p} holds tokens of sequence {b}, length {int(length[b])})")


def physical_blocks(block_table: torch.Tensor, seqlens: torch.Tensor, page_size: int,
                    num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids int64 [B, max_pages], used bool [B, max_pages])``: the table entries of each row's
    pages (``used``), and an in-range id everywhere (0 where not used), so a gather never reads
    an entry past a row's pages."""
    max_pages = block_table.shape[1]
    length = seqlens.to(torch.int64).clamp(0, max_pages * page_size)
    pages = torch.arange(max_pages, device=block_table.device)
    used = pages[None, :] * page_size < length[:, None]
    ids = block_table.to(torch.int64)
    used = used & (ids >= 0) & (ids < num_blocks)
    return torch.where(used, ids, 0), used


def gather_cache(pool: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor,
                 page_size: int) -> torch.Tensor:
    """The contiguous cache ``[B, Hkv, max_pages * P, D]`` that a pool and table describe (a
    copy; zeros in the pages past each row's length). The references decode through it."""
    num_blocks, _, kv_heads, dim = pool.shape
    ids, used = physical_blocks(block_table, seqlens, page_size, num_blocks)
    pages = pool[ids]  # [B, max_pages, P, Hkv, D]
    pages = torch.where(used[:, :, None, None, None], pages, torch.zeros((), dtype=pool.dtype, device=pool.device))
    batch, max_pages = ids.shape
    # contiguous, as a model's cache: the references' reductions then see the contiguous path's layout
    return pages.permute(0, 3, 1, 2, 4).reshape(batch, kv_heads, max_pages * page_size, dim).contiguous()


def gather_stats(block_table: torch.Tensor, seqlens: torch.Tensor, page_size: int,
                 *stats: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Per-block statistics ``[num_blocks, Hkv, D]`` gathered into the per-row layout
    ``[B, Hkv, max_pages, D]`` of the contiguous path (zeros past each row's pages; None stays
    None)."""
    out = []
    for stat in stats:
        if stat is None:
            out.append(None)
            continue
        ids, used = physical_blocks(block_table, seqlens, page_size, stat.shape[0])
        rows = torch.where(used[:, :, None, None], stat[ids], torch.zeros((), dtype=stat.dtype, device=stat.device))
        out.append(rows.permute(0, 2, 1, 3).contiguous())
    return tuple(out)


def pool_from_cache(cache: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pool [B * Np, P, Hkv, D], identity table int32 [B, Np])`` holding a contiguous cache
    ``[B, Hkv, Nmax, D]`` (a copy; rows past ``Nmax`` in the last page are zeros)."""
    batch, kv_heads, nmax, dim = cache.shape
    num_pages = -(-nmax // page_size)
    pad = num_pages * page_size - nmax
    padded = torch.nn.functional.pad(cache, (0, 0, 0, pad)) if pad else cache
    pool = padded.reshape(batch, kv_heads, num_pages, page_size, dim).permute(0, 2, 3, 1, 4)
    table = torch.arange(batch * num_pages, dtype=torch.int32, device=cache.device).view(batch, num_pages)
    return pool.reshape(batch * num_pages, page_size, kv_heads, dim).contiguous(), table


def cache_geometry(cache: torch.Tensor, page_size: int,
                   block_table: Optional[torch.Tensor]) -> tuple[int, int, tuple[int, int, int, int]]:
    """``(Hkv, capacity, strides)`` of a cache as the kernels address it: a contiguous
    ``[B, Hkv, Nmax, D]`` cache by its own strides; a pool ``[num_blocks, P, Hkv, D]`` (with a
    block table) by ``(block, head, row in block, dim)`` strides, capacity ``max_pages * P``."""
    if block_table is None:
        return cache.shape[1], cache.shape[2], tuple(cache.stride())
    s_blk, s_row, s_head, s_dim = cache.stride()
    return cache.shape[2], block_table.shape[1] * page_size, (s_blk, s_head, s_row, s_dim)


def table_args(block_table: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """A kernel's table arguments ``(table_ptr, row stride, column stride, HAS_TABLE)``; without a
    table, ``dummy`` stands in (never read)."""
    if block_table is None:
        return dummy, 0, 0, False
    return block_table, block_table.stride(0), block_table.stride(1), True


def selected_blocks(page_indices: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The physical block of every selected page, ``[B, Hkv, S]`` like ``page_indices`` (-1 where
    no page is selected): the K pass then loads a tile's blocks beside its logical pages instead
    of after them (a table lookup that waits for the page index costs one more dependent load per
    tile, ~60% of the dense step at 1M tokens on an H200)."""
    rows = block_table[:, None, :].expand(-1, page_indices.shape[1], -1)
    blocks = rows.gather(2, page_indices.clamp_min(0).long())
    return torch.where(page_indices >= 0, blocks, -1)


def pool_stats_strides(stat: torch.Tensor, block_table: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    """The ``(batch, KV head, page, dim)`` strides a kernel addresses a statistic with: the
    buffer's own for ``[B, Hkv, Npages, D]``; for per-block ``[num_blocks, Hkv, D]`` (with a
    table) batch stride 0 and the block stride as the page stride (the kernel indexes the page
    axis with ``block_table[b, page]``)."""
    if block_table is None:
        return tuple(stat.stride())
    return 0, stat.stride(1), stat.stride(0), stat.stride(2)


def logical_pages(kmin: torch.Tensor, block_table: Optional[torch.Tensor]) -> int:
    """Pages per sequence: ``kmin.shape[2]`` of a per-row buffer, or the table's width."""
    return kmin.shape[2] if block_table is None else block_table.shape[1]
