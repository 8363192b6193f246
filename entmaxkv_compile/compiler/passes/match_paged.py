"""Follow an attention's K or V operand back to a page pool read through a block table.

The form (vLLM's paged layout; ``examples/zoo/paged.py``): a pool buffer ``[num_blocks, P, Hkv, D]``,
an integer table ``[B, max_pages]`` that is a graph input, and

- **the read**: ``pool[table]`` (``[B, max_pages, P, Hkv, D]``) merged to ``[B, max_pages * P, Hkv, D]``
  by ``reshape``/``view`` and moved to ``[B, Hkv, N, D]`` by ``transpose(1, 2)`` (or
  ``permute(0, 2, 1, 3)``): logical key ``n = m * P + r`` of sequence ``b`` is row ``r`` of block
  ``table[b, m]``, pages in table order, because the merge is row-major;
- **the write**: ``flat = pool.view(-1, Hkv, D)`` written at a slot index by
  ``flat.index_put_((slot,), x)``, ``flat.index_copy_(0, slot, x)`` or ``flat[slot] = x``, where
  ``slot`` is proved, as an expression of the graph (:func:`_slot_expr`), to be
  ``table[b, pos // P] * P + pos % P`` for one position tensor ``pos`` (``[B, T]`` with
  ``table.gather(1, pos // P)``, or ``[T]`` shared by the rows with ``table[:, pos // P]``),
  flattened row-major. Flat row ``s`` of the pool is row ``s % P`` of block ``s // P``, so the
  token at logical position ``pos`` of sequence ``b`` lands where the read finds it.

The table must be the same graph input in the write and in both reads, and nothing in the graph
may write it. Anything else is refused with the rule that failed; a table computed inside the
graph (``table.flip(1)``, a slice, an ``arange``) is refused because its page order is not proved.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import sympy
import torch
from torch.fx import Node

from .symbolic import FRESH, kind_of
from .ir import arg, as_number, dtype_of, is_impure, normalize_dim, op_of, proves_equal, shape_of

#: The symbol of the block table's entries in a slot expression: ``TABLE(page)`` is the block
#: holding logical page ``page`` of the row the slot belongs to.
TABLE = sympy.Function("table")

_CASTS = frozenset({"long", "int", "to", "type", "type_as"})


class NotPaged(Exception):
    """A rule of the paged form failed; the message says which."""


def gathered_pool(logical: Node) -> Optional[tuple[Node, Node, Node]]:
    """``(pool, table, pages)`` when ``logical`` is ``pages = pool[table]`` merged to
    ``[B, M*P, H, D]`` and transposed to ``[B, H, M*P, D]``; None when it is not such a read at all."""
    kind = op_of(logical)
    source = arg(logical, 0)
    if kind == "transpose":
        dims = {normalize_dim(arg(logical, 1), 4), normalize_dim(arg(logical, 2), 4)}
        if dims != {1, 2}:
            return None
    elif kind == "permute":
        order = logical.args[1:] if len(logical.args) > 2 else arg(logical, 1)
        if tuple(normalize_dim(d, 4) for d in order or ()) != (0, 2, 1, 3):
            return None
    else:
        return None
    while op_of(source) in ("cast", "identity"):
        source = arg(source, 0)
    pages = arg(source, 0) if op_of(source) == "reshape" else None
    if op_of(pages) == "getitem":
        index = arg(pages, 1)
    elif isinstance(pages, Node) and pages.target is torch.ops.aten.index.Tensor:  # export graphs
        index = pages.args[1][0] if len(pages.args[1]) == 1 else None
    else:
        return None
    pool, table = arg(pages, 0), _uncast(index)
    if not isinstance(pool, Node) or not isinstance(table, Node):
        return None
    return pool, table, pages


def _uncast(node: Any) -> Any:
    """``node`` without integer casts (``table.long()``, ``.int()``, ``.to(dtype)``): same entries."""
    while _method(node) in _CASTS or op_of(node) == "cast":
        node = arg(node, 0)
    return node


def check_read(logical: Node, pool: Node, table: Node) -> None:
    """Raise :class:`NotPaged` unless the read is the whole pool gathered through a table input."""
    pool_shape, table_shape = shape_of(pool), shape_of(table)
    merged = shape_of(logical)
    merged = None if merged is None or len(merged) != 4 else (merged[0], merged[2], merged[1], merged[3])
    if pool.op not in ("placeholder", "get_attr"):
        raise NotPaged(f"the page pool read through the block table is not a buffer (reached {op_of(pool) or pool.op})")
    if pool_shape is None or len(pool_shape) != 4:
        raise NotPaged("the page pool is not a [num_blocks, page_size, Hkv, D] tensor")
    if table.op != "placeholder":
        raise NotPaged(f"the block table indexing the pool is computed inside the graph (reached "
                       f"{op_of(table) or table.target}), not a graph input: its page order is not proved")
    dtype = dtype_of(table)
    if table_shape is None or len(table_shape) != 2 or dtype is None or dtype.is_floating_point \
            or dtype == torch.bool:
        raise NotPaged(f"the block table {table.name} is not an integer [B, max_pages] tensor")
    batch, max_pages = table_shape
    _, page, heads, dim = pool_shape
    expected = (batch, max_pages * page, heads, dim)
    if merged is None or len(merged) != 4 or not all(_same(a, b) for a, b in zip(merged, expected)):
        raise NotPaged(f"pool[{table.name}] is merged to {merged}, not [B, max_pages * page_size, Hkv, D] = "
                       f"{list(expected)}: the pages are not read in table order")
    for node in table.users:
        if is_impure(node) and node.args and node.args[0] is table:
            raise NotPaged(f"the block table {table.name} is written inside the graph ({node.name})")


def find_write(pool: Node, read: Node, before: Node) -> Node:
    """This step's write of ``pool``: the last in-place write of ``pool.view(-1, H, D)`` before
    ``before``, made before the paged ``read`` gathers the pool. Every other in-place write that
    may reach the pool's memory (through any view) before ``before`` is refused."""
    order = {n: i for i, n in enumerate(pool.graph.nodes)}
    writes = []
    for node in pool.graph.nodes:
        if node is before:
            break
        if not (is_impure(node) and node.op in ("call_function", "call_method") and _reaches(node, pool)):
            continue
        flat = node.args[0] if node.args else None
        if not (isinstance(flat, Node) and op_of(flat) == "reshape" and arg(flat, 0) is pool):
            raise NotPaged(f"the page pool is written by {node.name} other than through pool.view(-1, Hkv, D) "
                           "at a slot index")
        writes.append(node)
    if not writes:
        raise NotPaged("no write of this step into the page pool (pool.view(-1, Hkv, D) at a slot index) was found")
    write = writes[-1]
    if order[write] > order[read]:
        raise NotPaged(f"the pool is gathered ({read.name}) before this step's write ({write.name}): the attention "
                       "does not read the token written this step")
    return write


def _reaches(write: Node, pool: Node) -> bool:
    """Whether ``write``'s target may be memory of ``pool``: its first input, followed through
    every op not known to return fresh memory, is the pool."""
    node = write.args[0] if write.args else None
    while isinstance(node, Node) and node is not pool and node.op in ("call_function", "call_method") \
            and kind_of(node) not in FRESH and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node is pool


def write_slot(write: Node, pool: Node) -> Node:
    """The slot index tensor of ``write`` on ``flat = pool.view(-1, Hkv, D)``."""
    flat = write.args[0]
    pool_shape, flat_shape = shape_of(pool), shape_of(flat)
    rows = pool_shape[0] * pool_shape[1]
    if flat_shape is None or len(flat_shape) != 3 or not _same(flat_shape[0], rows) \
            or not all(_same(a, b) for a, b in zip(flat_shape[1:], pool_shape[2:])):
        raise NotPaged(f"the pool is written through a view of shape {flat_shape}, not [num_blocks * page_size, "
                       "Hkv, D]")
    kind = str(write.target) if write.op == "call_method" else getattr(write.target, "__name__", "")
    if kind == "index_put_":
        indices = arg(write, 1)
        accumulate = write.args[3] if len(write.args) > 3 else write.kwargs.get("accumulate", False)
        if isinstance(indices, (list, tuple)) and len(indices) == 1 and isinstance(indices[0], Node) \
                and accumulate is False:
            return indices[0]
    elif kind == "index_copy_":
        if normalize_dim(arg(write, 1), 3) == 0 and isinstance(arg(write, 2), Node):
            return arg(write, 2)
    elif write.target is operator.setitem:
        index = write.args[1]
        if isinstance(index, tuple) and len(index) == 1:
            index = index[0]
        if isinstance(index, Node):
            return index
    raise NotPaged(f"the pool write {write.name} is not flat.index_put_((slot,), x), flat.index_copy_(0, slot, x) "
                   "or flat[slot] = x")


def slot_position(slot: Node, table: Node, page_size: int) -> Node:
    """The position tensor ``pos`` of a slot proved equal to ``table[b, pos // P] * P + pos % P``."""
    node = slot
    shape = shape_of(node)
    while op_of(node) in ("reshape", "flatten") or _method(node) in _CASTS:
        node = arg(node, 0)
    leaves: dict[sympy.Symbol, Node] = {}
    expr = _slot_expr(node, table, leaves)
    symbol, pos = next(iter(leaves.items())) if len(leaves) == 1 else (None, None)
    want = TABLE(sympy.floor(symbol / page_size)) * page_size + sympy.Mod(symbol, page_size) if symbol else None
    if want is None or sympy.simplify(sympy.expand(expr - want)) != 0:
        raise NotPaged(f"the pool is written at slot {expr}, not block_table[b, pos // {page_size}] * {page_size} + "
                       f"pos % {page_size}: the write index is not proved to be the position's block and offset")
    batch = shape_of(table)[0]
    before, pos_shape = shape_of(node), shape_of(pos)
    if before is None or len(before) != 2 or not _same(before[0], batch) or shape is None or len(shape) != 1:
        raise NotPaged(f"the slot index is not [B, T] = {[batch, 'T']} flattened row-major")
    if pos_shape is None or not (len(pos_shape) == 2 and _same(pos_shape[0], batch)
                                 or len(pos_shape) == 1 and _same(pos_shape[0], before[1])):
        raise NotPaged(f"the position tensor {pos.name} of the slot index is neither [B, T] nor [T]")
    return pos


def _slot_expr(node: Any, table: Node, leaves: dict[sympy.Symbol, Node]) -> Any:
    """``node`` as a sympy expression: ``+``, ``*`` by an int, ``//`` and ``%`` by an int, casts,
    ``table.gather(1, i)`` / ``table[:, i]`` as :data:`TABLE` ``(i)``; any other node a leaf symbol."""
    number = as_number(node)
    if number is not None and not isinstance(node, Node):
        if number != int(number):
            raise NotPaged(f"the slot index uses a non-integer constant {number}")
        return sympy.Integer(int(number))
    if not isinstance(node, Node):
        raise NotPaged(f"the slot index uses {node!r}")
    if _method(node) in _CASTS:
        return _slot_expr(arg(node, 0), table, leaves)
    name = _arith(node)
    if name is not None:
        left, right = (_slot_expr(a, table, leaves) for a in node.args[:2])
        if name == "add":
            return left + right
        if name == "mul":
            if not (left.is_Integer or right.is_Integer):
                raise NotPaged("the slot index multiplies two tensors")
            return left * right
        if not right.is_Integer or right <= 0:
            raise NotPaged(f"the slot index takes {name} by {right}, not by a positive int")
        return sympy.floor(left / right) if name == "floordiv" else sympy.Mod(left, right)
    if _method(node) == "gather" or node.target is torch.gather:
        if _uncast(arg(node, 0)) is not table or arg(node, 1) != 1:
            raise NotPaged("the slot index gathers from something other than the block table along its pages")
        return TABLE(_slot_expr(arg(node, 2), table, leaves))
    if op_of(node) == "getitem" and _uncast(arg(node, 0)) is table:
        index = arg(node, 1)
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], Node):
            return TABLE(_slot_expr(index[1], table, leaves))
        raise NotPaged("the slot index reads the block table other than as table[:, page] or table.gather(1, page)")
    if node is table:
        raise NotPaged("the slot index uses the block table other than by looking up a page")
    symbol = sympy.Symbol(node.name, integer=True)
    leaves[symbol] = node
    return symbol


def _method(node: Any) -> Optional[str]:
    return str(node.target) if isinstance(node, Node) and node.op == "call_method" else None


_ARITH = {
    operator.add: "add", torch.add: "add", "add": "add", "__add__": "add",
    operator.mul: "mul", torch.mul: "mul", "mul": "mul", "__mul__": "mul",
    operator.floordiv: "floordiv", torch.floor_divide: "floordiv", "floor_divide": "floordiv",
    "__floordiv__": "floordiv",
    operator.mod: "mod", torch.remainder: "mod", "remainder": "mod", "__mod__": "mod",
}


def _arith(node: Node) -> Optional[str]:
    if node.op not in ("call_function", "call_method") or len(node.args) != 2 or node.kwargs:
        if node.target is torch.div and node.kwargs.get("rounding_mode") == "floor" and len(node.args) == 2:
            return "floordiv"
        return None
    try:
        return _ARITH.get(node.target)
    except TypeError:
        return None


def _same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and proves_equal(a - b, 0)
