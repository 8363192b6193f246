"""Follow an attention's K or V operand back to a static cache buffer and the write of this step.

Accepted reads: the buffer itself, through casts, ``contiguous`` and the GQA spellings
(``repeat_interleave`` on the head axis, ``[:, :, None].expand(...).reshape(...)`` as in HF's
``repeat_kv``, or ``.flatten(1, 2)``; a single KV head ``expand``-ed to every query head; a size-1
head axis left for the matmul to broadcast is handled by ``match_attention``). Accepted writes, at an integer position tensor on the sequence axis (dim 2):
``buf[:, :, pos] = x`` (gpt-fast), ``buf.index_copy_(2, pos, x)`` (HF, either the 4.5x
``cache_position`` or the 5.x in-graph counter), ``buf.index_put_((None, None, pos), x)``, and their
functional forms followed by ``copy_`` into the buffer (export graphs). A ``torch.cat`` of past
and new keys is refused: it cannot be made sparse without copying the whole cache every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import Node

from .ir import PASS_THROUGH, arg, as_number, dtype_of, normalize_dim, ndim_of, op_of, proves_equal, shape_of

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
    """The static buffer an attention operand reads and how it is written this step."""

    cache: Optional[Node]
    group: int = 1
    write: Optional[Node] = None
    positions: Optional[Node] = None
    refusal: str = ""


def trace_cache(read: Node, before: Node) -> CacheRead:
    """Resolve ``read`` (a ``[B, H, N, D]`` operand) to its cache buffer and this step's write."""
    node, group = read, 1
    while True:
        kind = op_of(node)
        if kind in PASS_THROUGH:
            node = arg(node, 0)
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
        elif kind in ("index_copy_", "index_put_"):
            node = arg(node, 0)
        elif kind in ("index_copy", "index_put") and isinstance(arg(node, 0), Node):
            return _functional_write(node, group)
        elif kind == "cat":
            return CacheRead(None, group, refusal=CONCAT_REASON)
        elif isinstance(node, Node) and node.op in ("placeholder", "get_attr"):
            return _with_write(node, group, before)
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


def _write_positions(write: Node) -> tuple[Optional[Node], str]:
    """The position tensor of a write on the sequence axis, or ``(None, reason)``."""
    kind = op_of(write)
    full = slice(None, None, None)
    if kind == "setitem":
        index = write.args[1]
        if isinstance(index, tuple) and len(index) == 3 and index[:2] == (full, full) and isinstance(index[2], Node):
            return _int_tensor(index[2])
        return None, "cache write is not buf[:, :, positions] = x"
    if kind in ("index_copy_", "index_copy"):
        if normalize_dim(arg(write, 1), ndim_of(arg(write, 0))) != 2:
            return None, "cache index_copy is not on the sequence axis (dim 2)"
        return _int_tensor(arg(write, 2))
    if kind in ("index_put_", "index_put"):
        indices = arg(write, 1)
        if isinstance(indices, (list, tuple)) and len(indices) == 3 and indices[0] is None \
                and indices[1] is None and isinstance(indices[2], Node):
            return _int_tensor(indices[2])
        return None, "cache index_put is not buf[:, :, positions]"
    return None, f"unsupported cache write {kind}"


def _int_tensor(node: Node) -> tuple[Optional[Node], str]:
    dtype = dtype_of(node)
    if dtype is not None and (dtype.is_floating_point or dtype == torch.bool):
        return None, f"cache write positions must be an integer tensor, got {dtype}"
    return node, ""


def _with_write(cache: Node, group: int, before: Node) -> CacheRead:
    writes = []
    for node in cache.graph.nodes:
        if node is before:
            break
        if op_of(node) in ("setitem", "index_copy_", "index_put_") and node.args and node.args[0] is cache:
            writes.append(node)
    if not writes:
        return CacheRead(cache, group, refusal="no write of this step at a position tensor was found for the cache")
    positions, why = _write_positions(writes[-1])
    return CacheRead(cache, group, writes[-1], positions, why)


def _functional_write(write: Node, group: int) -> CacheRead:
    """Export graphs: ``new = index_copy(buf, 2, pos, x)`` read by attention, ``buf.copy_(new)`` later."""
    cache = arg(write, 0)
    copied_back = any(op_of(user) == "copy_" and arg(user, 0) is cache for user in write.users)
    if cache.op not in ("placeholder", "get_attr") or not copied_back:
        return CacheRead(None, group, refusal="K/V comes from a functional update that is not copied back to a buffer")
    positions, why = _write_positions(write)
    return CacheRead(cache, group, write, positions, why)
