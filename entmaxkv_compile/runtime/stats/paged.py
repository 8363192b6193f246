"""Page statistics of a paged KV cache: kept per physical block, addressed through a block table.

The pool layout, the table and the sharing rules are in ``runtime/paged.py``. The four buffers
are ``[num_blocks, Hkv, D]`` (a block's statistics describe its content, whichever sequences list
it); the order state (``last_position``, ``valid``, ``certify_skip``) stays per sequence ``[B]``,
as in :class:`~entmaxkv_compile.runtime.stats.reference.KVPageStats`.

The pure-torch functions here are the oracle of the ``HAS_TABLE`` paths of the statistics
kernels (``stats/kernel.py``): they gather the rows through the table, run the contiguous
reference, and write back only the blocks of each row's pages.
"""

from __future__ import annotations

import torch

from ...checks import FLOAT_DTYPES, check_page_size, check_tensor, has_values
from ..paged import check_block_table, check_pool, check_pool_stats, gather_cache, physical_blocks
from .reference import (
    append_in_order,
    resolve_moment_dtype,
    stats_append_,
    stats_prefill_,
    stats_state_after_prefill_,
    stats_track_,
    stats_valid_for,
)

__all__ = ["PagedKVStats", "paged_stats_append_", "paged_stats_impl", "paged_stats_prefill_"]


def _write_blocks(stats: tuple[torch.Tensor, ...], target: torch.Tensor, values: tuple[torch.Tensor, ...]) -> None:
    """``stat[target[i]] = value[i]`` where ``target[i] < num_blocks``; a target equal to
    ``num_blocks`` writes nowhere (a scratch row), so no host sync picks the rows."""
    for stat, value in zip(stats, values):
        scratch = torch.cat([stat, stat.new_zeros((1,) + tuple(stat.shape[1:]))])
        scratch.index_put_((target,), value.to(stat.dtype))
        stat.copy_(scratch[:-1])


def paged_stats_prefill_(k_pool: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor, page_size: int,
                         kmin: torch.Tensor, kmax: torch.Tensor, kmean: torch.Tensor, km2: torch.Tensor) -> None:
    """Per-block statistics ``[num_blocks, Hkv, D]`` of every page ``p < ceil(seqlens[b] / P)``
    of every row, from block ``block_table[b, p]`` of ``k_pool [num_blocks, P, Hkv, D]``, in
    place. Other blocks are left as they are; a block shared by two rows gets the same values
    from both when it is full in both (see ``runtime/paged.py``)."""
    num_blocks, _, kv_heads, head_dim = k_pool.shape
    batch, max_pages = block_table.shape
    contiguous = gather_cache(k_pool, block_table, seqlens, page_size)
    rows = [torch.empty((batch, kv_heads, max_pages, head_dim), dtype=s.dtype, device=s.device)
            for s in (kmin, kmax, kmean, km2)]
    stats_prefill_(contiguous, seqlens, page_size, *rows)
    ids, used = physical_blocks(block_table, seqlens, page_size, num_blocks)
    target = torch.where(used, ids, num_blocks).flatten()
    values = tuple(r.permute(0, 2, 1, 3).reshape(batch * max_pages, kv_heads, head_dim) for r in rows)
    _write_blocks((kmin, kmax, kmean, km2), target, values)


def paged_stats_append_(k_pool: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor, page_size: int,
                        kmin: torch.Tensor, kmax: torch.Tensor, kmean: torch.Tensor, km2: torch.Tensor) -> None:
    """Fold row ``positions[b] % P`` of block ``block_table[b, positions[b] // P]`` into that
    block's statistics, in place (a Welford step; reset at a page start). A position outside
    ``[0, max_pages * P)`` reads and writes nothing. The block must not be shared (copy on write)."""
    num_blocks, _, kv_heads, head_dim = k_pool.shape
    batch, max_pages = block_table.shape
    capacity = max_pages * page_size
    pos = positions.to(torch.int64)
    inside = (pos >= 0) & (pos < capacity)
    pos = pos.clamp(0, capacity - 1)
    blk = block_table.gather(1, (pos // page_size)[:, None])[:, 0].to(torch.int64)
    inside = inside & (blk >= 0) & (blk < num_blocks)
    blk = torch.where(inside, blk, 0)
    # the one row and the current statistics of its block, as a one-page contiguous cache
    row = k_pool[blk, pos % page_size]  # [B, Hkv, D]
    offset = pos % page_size
    cache = row.new_zeros((batch, kv_heads, page_size, head_dim))
    cache.scatter_(2, offset.view(batch, 1, 1, 1).expand(batch, kv_heads, 1, head_dim), row[:, :, None, :])
    page = [s[blk][:, :, None, :].clone() for s in (kmin, kmax, kmean, km2)]  # [B, Hkv, 1, D]
    stats_append_(cache, torch.where(inside, offset, -1), page_size, *page)
    target = torch.where(inside, blk, num_blocks)
    _write_blocks((kmin, kmax, kmean, km2), target, tuple(p[:, :, 0, :] for p in page))


class PagedKVStats:
    """The page statistics of one layer's paged K cache: four ``[num_blocks, Hkv, D]`` buffers
    and the per-sequence order state ``[B]`` (``last_position``, ``valid``, ``certify_skip``).

    ``max_pages`` is the block table's width (pages per sequence), so a sequence holds at most
    ``max_pages * page_size`` tokens. ``prefill``/``append`` take the pool and the table of that
    step (a table may change between steps as the engine allocates blocks). On a GPU with usable
    kernels they run the ``HAS_TABLE`` kernels, elsewhere the references above.
    """

    def __init__(self, kmin: torch.Tensor, kmax: torch.Tensor, kmean: torch.Tensor, km2: torch.Tensor,
                 page_size: int, batch: int, max_pages: int) -> None:
        self.page_size = check_page_size(page_size)
        check_tensor("kmin", kmin)
        if kmin.dim() != 3:
            raise ValueError(f"kmin must have shape [num_blocks, Hkv, D], got {tuple(kmin.shape)}")
        for name, value in (("batch", batch), ("max_pages", max_pages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        table = torch.empty((batch, max_pages), dtype=torch.int32, device=kmin.device)
        check_pool_stats(table, kmin.shape[1], kmin.shape[2], kmin, kmax, kmean, km2)
        self.kmin, self.kmax, self.kmean, self.km2 = kmin, kmax, kmean, km2
        self.batch, self.max_pages = batch, max_pages
        self.last_position = torch.full((batch,), -1, dtype=torch.int64, device=kmin.device)
        self.valid = torch.ones((batch,), dtype=torch.bool, device=kmin.device)
        self.certify_skip = torch.zeros((batch,), dtype=torch.int32, device=kmin.device)

    @classmethod
    def allocate(cls, num_blocks: int, kv_heads: int, head_dim: int, *, batch: int, max_pages: int,
                 page_size: int = 16, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 moment_dtype: torch.dtype | str | None = None) -> "PagedKVStats":
        """Zeroed statistics for a pool of ``num_blocks`` blocks (kmin/kmax in ``dtype``, the
        moments in ``moment_dtype``: None = float32) read by ``batch`` sequences of at most
        ``max_pages`` pages."""
        for name, value in (("num_blocks", num_blocks), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        moments = resolve_moment_dtype(moment_dtype, dtype)
        shape = (num_blocks, kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=moments, device=device), torch.zeros(shape, dtype=moments, device=device),
                   page_size, batch, max_pages)

    @property
    def num_pages(self) -> int:
        """Pages per sequence (the block table's width)."""
        return self.max_pages

    @property
    def capacity(self) -> int:
        """Tokens per sequence, ``max_pages * page_size``."""
        return self.max_pages * self.page_size

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kmin, kmax, kmean, km2)``, each ``[num_blocks, Hkv, D]``."""
        return self.kmin, self.kmax, self.kmean, self.km2

    def check_pool(self, k_pool: torch.Tensor, block_table: torch.Tensor) -> None:
        """Raise ``ValueError`` unless the pool and table are those these statistics describe."""
        check_pool("k_pool", k_pool, self.page_size)
        expected = tuple(self.kmin.shape)
        if (k_pool.shape[0], k_pool.shape[2], k_pool.shape[3]) != expected or k_pool.dtype != self.kmin.dtype:
            raise ValueError(f"k_pool {tuple(k_pool.shape)} {k_pool.dtype} does not match these statistics "
                             f"[num_blocks, Hkv, D] = {expected} {self.kmin.dtype}")
        check_block_table(block_table, self.batch, device=self.kmin.device)
        if block_table.shape[1] != self.max_pages:
            raise ValueError(f"block_table must have max_pages = {self.max_pages} columns, got {block_table.shape[1]}")

    def prefill(self, k_pool: torch.Tensor, seqlens: torch.Tensor, block_table: torch.Tensor) -> None:
        """Recompute the blocks of each row's first ``seqlens[b]`` tokens (and mark the order
        state valid, ``last_position = seqlens - 1``)."""
        self.check_pool(k_pool, block_table)
        paged_stats_impl(k_pool)(k_pool, block_table, seqlens, self.page_size, *self.buffers())
        stats_state_after_prefill_(seqlens, self.capacity, self.last_position, self.valid)

    def append(self, k_pool: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor, *,
               check_values: bool = False) -> None:
        """Fold the rows just written at ``positions`` (int ``[B]``) into their blocks; an append
        out of order clears that sequence's ``valid`` on device (``check_values``: raises, a sync)."""
        self.check_pool(k_pool, block_table)
        if check_values and has_values(positions):
            in_order = append_in_order(positions, self.last_position, self.page_size, self.capacity)
            if not bool(in_order.all()):
                raise ValueError(f"positions must continue each sequence or restart it at a page boundary "
                                 f"(page_size={self.page_size}); got {positions.tolist()} after "
                                 f"{self.last_position.tolist()}")
        paged_stats_impl(k_pool, append=True)(k_pool, block_table, positions, self.page_size, *self.buffers())
        stats_track_(positions, self.page_size, self.capacity, self.last_position, self.valid)

    def valid_for(self, seqlens: torch.Tensor) -> torch.Tensor:
        """bool ``[B]``: the statistics soundly describe the first ``seqlens`` tokens of each row."""
        return stats_valid_for(self.last_position, self.valid, seqlens)

    def sequence_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(last_position, valid, certify_skip)``."""
        return self.last_position, self.valid, self.certify_skip


def paged_stats_impl(k_pool: torch.Tensor, append: bool = False):
    """The statistics kernels (``HAS_TABLE``) on a GPU where they run, else the references; as
    ``(pool, table, lengths, page_size, *stats)``."""
    if k_pool.device.type == "cuda":
        from .. import kernels

        if kernels.available(k_pool.device):
            kernel = kernels.stats_append_ if append else kernels.stats_prefill_
            return lambda pool, table, lengths, page_size, *stats: kernel(pool, lengths, page_size, *stats, table)
    return paged_stats_append_ if append else paged_stats_prefill_
