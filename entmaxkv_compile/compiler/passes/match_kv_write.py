"""Follow an attention's K or V operand back to a static cache buffer and the write of this step.

Accepted reads: the buffer itself, through casts, ``contiguous`` and the GQA spellings
(``repeat_interleave`` on the head axis, ``[:, :, None].expand(...).reshape(...)`` as in HF's
``repeat_kv`` or ``.flatten(1, 2)``, one KV head ``expand``-ed to every query head; a size-1 head
axis the matmuls broadcast is checked in ``verify.py``). Accepted writes, at an integer position
tensor on the sequence axis (dim 2): ``buf[:, :, pos] = x`` (gpt-fast), ``buf.index_copy_(2, pos,
x)`` (HF, either the 4.5x ``cache_position`` or the 5.x in-graph counter),
``buf.index_put_((None, None, pos), x)``, and their functional forms followed by ``copy_`` into the
buffer (export graphs). A ragged decode step writes each sequence at its own position
``pos [B]``: ``buf[rows, :, pos] = x`` or ``buf.index_put_((rows, None, pos), x)`` with ``rows``
the row index (``proofs.py`` proves it is ``arange(B)``), or ``buf.scatter_(2, index, x)`` with
``index = pos.view(B, 1, 1, 1).expand(B, H, 1, D)``. A fused buffer ``kv[2, B, H, N, D]`` read as
``kv[0]``/``kv[1]`` is written through its parts (``kv[0].index_copy_(2, pos, k)``,
``kv[0][:, :, pos] = k``) or as a whole (``kv[:, :, :, pos] = x``). A page pool read through a
block table (``pool[table].reshape(B, N, H, D).transpose(1, 2)``, vLLM's layout) is followed by
``match_paged.py``. A ``torch.cat`` of past and new keys is refused: it cannot be made
sparse without copying the whole cache every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import Node

from .match_paged import NotPaged, check_read, find_write, gathered_pool, slot_position, write_slot
from .ir import PASS_THROUGH, arg, as_number, concrete, dtype_of, normalize_dim, ndim_of, op_of, proves_equal, shape_of

CONCAT_REASON = (
    "concatenating KV cache (torch.cat of past and new keys): sparse decoding would copy the whole "
    "cache every step; use a static cache (gpt-fast KVCache, transformers StaticCache)"
)


LAZY_REASON = (
    "the KV cache is created inside this graph (a lazily allocated cache): its page statistics are "
    "filled when a decode step first reads it"
)
GQA_REASON = (
    "K/V heads are expanded to the query heads in a way not proved to be the GQA map (query head h "
    "reads KV head h // G): expected k[:, :, None].expand(B, Hkv, G, N, D) merged by reshape/flatten(1, 2), "
    "or one KV head expanded"
)
_FACTORIES = frozenset({"zeros", "empty", "full", "zeros_like", "empty_like", "new_zeros", "new_empty"})


@dataclass(frozen=True)
class CacheRead:
    """The static buffer an attention operand reads and how it is written this step.

    ``part``: for a fused buffer ``kv[2, B, H, N, D]`` (one allocation for K and V), the index on
    its leading axis this operand reads (``kv[0]`` is K, ``kv[1]`` V); ``cache`` is then the fused
    buffer and :meth:`view` takes the ``[B, H, N, D]`` part of a value of it. ``rows``: a per-row
    write (a ragged batch) pairs ``rows[b]`` with ``positions[b]``; None when every row is
    written at the same ``positions``. ``scatter``: ``positions`` is the index of
    ``buf.scatter_(2, positions, x)``, one index per written element (``proofs.py`` proves it
    covers every head and feature of each row with that row's one position). ``table``: a page
    pool ``cache [num_blocks, P, H, D]`` read through this block table (a graph input);
    ``logical`` is then the ``[B, H, N, D]`` read ``pool[table]`` merged and transposed, and
    ``positions`` the position tensor the write's slot index is proved to be built from
    (``match_paged.py``).
    """

    cache: Optional[Node]
    group: int = 1
    write: Optional[Node] = None
    positions: Optional[Node] = None
    refusal: str = ""
    part: Optional[int] = None
    rows: Optional[Node] = None  # per-row write ``buf[rows, :, positions]``: the row index tensor
    scatter: bool = False  # ``positions`` is a scatter index ``[B, H, 1, D]`` on the sequence axis
    table: Optional[Node] = None  # a page pool read through this block table (``match_paged.py``)
    logical: Optional[Node] = None  # the paged read ``[B, H, N, D]`` (``pool[table]``, merged, transposed)

    @property
    def key(self) -> tuple[Optional[Node], Optional[int]]:
        """What identifies the cache: the buffer, and the part of a fused buffer."""
        return self.cache, self.part

    def shape(self) -> Optional[tuple[Any, ...]]:
        """The ``[B, H, N, D]`` shape of the cache this operand reads (the logical cache of a paged read)."""
        if self.logical is not None:
            return shape_of(self.logical)
        shape = shape_of(self.cache)
        return shape if shape is None or self.part is None else shape[1:]

    def view(self, value: Any) -> Any:
        """The cache's ``[B, H, N, D]`` tensor, given the buffer's value."""
        return value if self.part is None else value[self.part]


def trace_cache(read: Node, before: Node) -> CacheRead:
    """Resolve ``read`` (a ``[B, H, N, D]`` operand) to its cache buffer and this step's write."""
    node, group, part = read, 1, None
    while True:
        kind = op_of(node)
        if kind in PASS_THROUGH:
            node = arg(node, 0)
        elif kind in ("transpose", "permute") and gathered_pool(node) is not None:
            return trace_paged(node, group, before)
        elif kind in ("getitem", "select") and part is None and part_index(node) is not None:
            part, node = part_index(node), arg(node, 0)
        elif kind == "repeat_interleave" and _dim(node, arg(node, 2)) == 1 and as_number(arg(node, 1)):
            group *= int(arg(node, 1))
            node = arg(node, 0)
        elif kind in ("reshape", "flatten") and _grouped_source(node) is not None:
            source, factor = _grouped_source(node)
            group *= factor
            node = source
        elif kind == "expand" and _broadcast_source(node) is not None:
            source, factor = _broadcast_source(node)
            group *= factor
            node = source
        elif kind == "expand" or (kind in ("reshape", "flatten") and op_of(arg(node, 0)) == "expand"):
            return CacheRead(None, group, refusal=GQA_REASON)
        elif kind in ("index_copy_", "index_put_", "scatter_"):
            node = arg(node, 0)
        elif kind in ("index_copy", "index_put", "scatter") and isinstance(arg(node, 0), Node) and part is None:
            return _functional_write(node, group)
        elif kind == "cat":
            return CacheRead(None, group, refusal=CONCAT_REASON)
        elif isinstance(node, Node) and node.op in ("placeholder", "get_attr"):
            return _with_write(node, group, before, part)
        elif isinstance(node, Node) and getattr(node.target, "__name__", "") in _FACTORIES:
            return CacheRead(None, group, refusal=LAZY_REASON)
        else:
            what = kind or (node.format_node() if isinstance(node, Node) else repr(node))
            return CacheRead(None, group, refusal=f"K/V is not read from a static cache buffer (reached {what})")
        if not isinstance(node, Node):
            return CacheRead(None, group, refusal="K/V is not read from a static cache buffer")


def _dim(node: Node, dim: Any) -> Optional[int]:
    return normalize_dim(dim, ndim_of(node))


def _same(a: Any, b: Any) -> bool:
    """Two sizes (ints or symbolic) provably equal."""
    return a is not None and b is not None and proves_equal(a - b, 0)


def _grouped_source(merge: Node) -> Optional[tuple[Node, int]]:
    """``(K, G)`` for ``K[:, :, None].expand(B, H, G, N, D)`` (or ``unsqueeze(2)``) merged back to
    ``[B, H*G, N, D]`` by ``reshape``/``view`` or ``flatten(1, 2)``.

    Proved from the shapes alone: the new axis 2 has size 1 before the expand, so every ``g`` reads
    the same row, and merging axes (1, 2) in row-major order gives query head ``h = kv*G + g``,
    i.e. query head ``h`` reads KV head ``h // G`` (a tiled ``[:, None]`` expand is not accepted).
    """
    expand = arg(merge, 0)
    if op_of(expand) != "expand":
        return None
    inner = arg(expand, 0)
    kind = op_of(inner)
    if kind == "unsqueeze" and _dim(inner, arg(inner, 1)) == 2:
        source = arg(inner, 0)
    elif kind == "getitem" and _is_new_axis_at_2(arg(inner, 1)):
        source = arg(inner, 0)
    else:
        return None
    src, wide, out = shape_of(source), shape_of(expand), shape_of(merge)
    if src is None or wide is None or out is None or len(src) != 4 or len(wide) != 5 or len(out) != 4:
        return None
    if op_of(merge) == "flatten" and (_dim(expand, arg(merge, 1)), _dim(expand, arg(merge, 2, -1))) != (1, 2):
        return None
    unchanged = all(_same(wide[i], src[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3)))
    merged = all(_same(out[i], w) for i, w in ((0, wide[0]), (1, wide[1] * wide[2]), (2, wide[3]), (3, wide[4])))
    if not (unchanged and merged and isinstance(wide[2], int)):
        return None
    return source, wide[2]


def _broadcast_source(expand: Node) -> Optional[tuple[Node, int]]:
    """``(K, H)`` for a single KV head ``K [B, 1, N, D]`` expanded to ``[B, H, N, D]`` (MQA):
    every query head ``h`` reads KV head ``0 = h // H``."""
    source = arg(expand, 0)
    src, out = shape_of(source), shape_of(expand)
    if src is None or out is None or len(src) != 4 or len(out) != 4 or not _same(src[1], 1):
        return None
    if not (all(_same(out[i], src[i]) for i in (0, 2, 3)) and isinstance(out[1], int)):
        return None
    return source, out[1]


def _is_new_axis_at_2(index: Any) -> bool:
    if not isinstance(index, tuple) or len(index) < 3:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and index[2] is None and all(
        i == full or i is Ellipsis for i in index[3:]
    )


def part_index(node: Node) -> Optional[int]:
    """``i`` for ``buf[i]`` / ``buf.select(0, i)`` taking a ``[B, H, N, D]`` part of a 5-D fused buffer."""
    source = arg(node, 0)
    shape = shape_of(source)
    if shape is None or len(shape) != 5 or not isinstance(shape[0], int) or ndim_of(node) != 4:
        return None
    if op_of(node) == "select":
        index = arg(node, 2) if _dim(source, arg(node, 1)) == 0 else None
    else:
        index = arg(node, 1)
        if isinstance(index, tuple) and len(index) == 1:
            index = index[0]
    if isinstance(index, bool) or not isinstance(index, int) or not -shape[0] <= index < shape[0]:
        return None
    return index % shape[0]


def _write_positions(write: Node, fused: bool = False) -> tuple[Optional[Node], Optional[Node], str]:
    """``(positions, rows, "")`` of a write on the sequence axis, or ``(None, None, reason)``.

    ``rows`` is the row index tensor of a per-row write (``buf[rows, :, pos] = x``), else None.
    ``fused``: the write is on a whole fused buffer ``[2, B, H, N, D]`` (``kv[:, :, :, pos] = kv_new``,
    ``kv[0, :, :, pos] = k``): one more leading axis.
    """
    kind = op_of(write)
    full = slice(None, None, None)
    lead = 1 if fused else 0
    if kind == "setitem":
        index = write.args[1]
        if isinstance(index, tuple) and len(index) == 3 + lead and all(i == full for i in index[lead:lead + 2]) \
                and isinstance(index[-1], Node):
            return _int_tensor(index[-1])
        if not fused and isinstance(index, tuple) and len(index) == 3 and isinstance(index[0], Node) \
                and index[1] == full and isinstance(index[2], Node):
            return _int_tensor(index[2], index[0])
        return None, None, "cache write is not buf[:, :, positions] = x (nor buf[rows, :, positions] = x)" \
            if not fused else "fused cache write is not kv[:, :, :, positions] = x (or kv[i, :, :, positions])"
    if kind in ("index_copy_", "index_copy"):
        if normalize_dim(arg(write, 1), ndim_of(arg(write, 0))) != 2 + lead:
            return None, None, "cache index_copy is not on the sequence axis (dim 2)"
        return _int_tensor(arg(write, 2))
    if kind in ("index_put_", "index_put"):
        indices = arg(write, 1)
        if isinstance(indices, (list, tuple)) and len(indices) == 3 + lead \
                and all(i is None for i in indices[:-1]) and isinstance(indices[-1], Node):
            return _int_tensor(indices[-1])
        if not fused and isinstance(indices, (list, tuple)) and len(indices) == 3 and isinstance(indices[0], Node) \
                and indices[1] is None and isinstance(indices[2], Node):
            return _int_tensor(indices[2], indices[0])
        return None, None, "cache index_put is not buf[:, :, positions] (nor buf[rows, :, positions])"
    if kind in ("scatter_", "scatter") and not fused:
        src = write.args[3] if len(write.args) > 3 else write.kwargs.get("src")
        if normalize_dim(arg(write, 1), ndim_of(arg(write, 0))) != 2 or not isinstance(arg(write, 2), Node) \
                or not isinstance(src, Node) or len(write.args) > 4 or "reduce" in write.kwargs:
            return None, None, "cache scatter is not buf.scatter_(2, index, x) on the sequence axis"
        return _int_tensor(arg(write, 2))
    return None, None, f"unsupported cache write {kind}"


def _int_tensor(node: Node, rows: Optional[Node] = None) -> tuple[Optional[Node], Optional[Node], str]:
    for index, what in ((node, "positions"), (rows, "row index")):
        dtype = dtype_of(index) if index is not None else None
        if dtype is not None and (dtype.is_floating_point or dtype == torch.bool):
            return None, None, f"cache write {what} must be an integer tensor, got {dtype}"
    return node, rows, ""


_WRITES = ("setitem", "index_copy_", "index_put_", "scatter_")

#: A cache rewritten whole each step (``cache.copy_(rolled)``), as transformers' ``StaticSlidingWindowLayer``
#: does once its window is full: every row moves, so no page statistics can be appended in O(D).
ROLLED_REASON = ("the cache is overwritten whole this step (cache.copy_(...), e.g. a buffer rolled by one row as "
                 "transformers' StaticSlidingWindowLayer does once its window is full): every page changes, so its "
                 "statistics cannot be appended; keep a full-length cache written at the position and let the mask "
                 "apply the window (entmaxkv_compile.integrations.full_length_static_cache)")


def _touches(write: Node, part: int) -> bool:
    """Whether a write on a whole fused buffer may write ``part`` (an other constant part: no)."""
    shape = shape_of(write.args[0])
    if op_of(write) == "setitem" and isinstance(write.args[1], tuple) and write.args[1] and shape:
        first = write.args[1][0]
        return not (isinstance(first, int) and not isinstance(first, bool) and first % shape[0] != part)
    return True


def _with_write(cache: Node, group: int, before: Node, part: Optional[int] = None) -> CacheRead:
    """The last write of ``cache`` (of its ``part``, for a fused buffer) before ``before``."""
    writes = []
    overwritten: Optional[Node] = None  # the last ``cache.copy_(...)``: the whole buffer rewritten
    for node in cache.graph.nodes:
        if node is before:
            break
        if op_of(node) == "copy_" and node.args and node.args[0] is cache and part is None:
            overwritten = node
            writes.clear()
            continue
        if op_of(node) not in _WRITES or not node.args:
            continue
        target = node.args[0]
        if target is cache and (part is None or _touches(node, part)):
            writes.append((node, part is not None))
        elif part is not None and op_of(target) in ("getitem", "select") and arg(target, 0) is cache \
                and part_index(target) == part:
            writes.append((node, False))
    if not writes:
        why = "no write of this step at a position tensor was found for the cache"
        return CacheRead(cache, group, refusal=ROLLED_REASON if overwritten is not None else why, part=part)
    write, fused = writes[-1]
    positions, rows, why = _write_positions(write, fused)
    return CacheRead(cache, group, write, positions, why, part, rows, op_of(write) == "scatter_")


def trace_paged(logical: Node, group: int, before: Node) -> CacheRead:
    """A page pool read through a block table (``match_paged.py``): the pool, the table, this
    step's write and the position its slot index is built from, or the rule that failed."""
    pool, table, pages = gathered_pool(logical)
    try:
        check_read(logical, pool, table)
        write = find_write(pool, pages, before)
        positions = slot_position(write_slot(write, pool), table, concrete(shape_of(pool)[1]))
    except NotPaged as why:
        return CacheRead(None, group, refusal=f"paged KV cache: {why}", table=table)
    return CacheRead(pool, group, write, positions, table=table, logical=logical)


def _functional_write(write: Node, group: int) -> CacheRead:
    """Export graphs: ``new = index_copy(buf, 2, pos, x)`` read by attention, ``buf.copy_(new)`` later."""
    cache = arg(write, 0)
    copied_back = any(op_of(user) == "copy_" and arg(user, 0) is cache for user in write.users)
    if cache.op not in ("placeholder", "get_attr") or not copied_back:
        return CacheRead(None, group, refusal="K/V comes from a functional update that is not copied back to a buffer")
    positions, rows, why = _write_positions(write)
    return CacheRead(cache, group, write, positions, why, rows=rows, scatter=op_of(write) == "scatter")


def row_positions(positions: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: each sequence's position from a per-row write's positions (``[B]``, or a
    scatter index ``[B, H, 1, D]`` proved to hold one value per row)."""
    return positions.reshape(positions.shape[0], -1)[:, 0].to(torch.int64)
