"""The rule of each op the symbolic evaluator models: a node's inputs as :class:`Sym` -> its :class:`Sym`.

Masks and position indices are built from few ops (arange, comparisons, where/masked_fill,
views, indexing by the position, tril/triu, copies). A rule reads its operands through the
evaluator (``ev.operand``) and raises :class:`Unproven` for any use it does not model.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import sympy
import torch
from torch.fx import Node

from .ir import arg
from .symbolic import (
    OPAQUE,
    ROW,
    EvaluatorLike,
    Sym,
    Unproven,
    _const,
    _scalar,
    _squeeze_singletons,
    as_number,
    broadcast,
    index_symbol,
    is_boolean,
    is_opaque,
)

def _identity(ev: EvaluatorLike, node: Node) -> Sym:
    source = ev.operand(node, 0)
    shape = ev._shape(node)
    if shape != source.shape:
        raise Unproven(f"{node.name} changes the shape {source.shape} -> {shape}")
    return source


def _cast(ev: EvaluatorLike, node: Node) -> Sym:
    source = ev.operand(node, 0)
    value = node.meta.get("example_value", node.meta.get("val"))
    dtype = getattr(value, "dtype", None)
    before = getattr(arg(node, 0), "meta", {}).get("example_value", getattr(arg(node, 0), "meta", {}).get("val"))
    if dtype is not None and not dtype.is_floating_point and dtype != torch.bool \
            and getattr(before, "dtype", torch.float32).is_floating_point:
        raise Unproven(f"{node.name} casts floats to integers (rounding is not modelled)")
    if dtype is not None and dtype != torch.bool:
        return Sym(as_number(source.expr), source.axes, source.shape)
    if dtype == torch.bool and not is_boolean(source.expr):
        return Sym(sympy.Ne(source.expr, 0), source.axes, source.shape)
    return source


def _binary(fn: Callable[[Any, Any], Any], boolean: bool = False) -> Callable[[EvaluatorLike, Node], Sym]:
    def handler(ev: EvaluatorLike, node: Node) -> Sym:
        a, b = ev.operand(node, 0), ev.operand(node, 1)
        (x, y), axes = broadcast(ev._shape(node), a, b)
        if not boolean:
            x, y = as_number(x), as_number(y)
        return Sym(fn(x, y), axes, ev._shape(node))

    return handler


def _neg(ev: EvaluatorLike, node: Node) -> Sym:
    a = ev.operand(node, 0)
    return Sym(-as_number(a.expr), a.axes, a.shape)


def _not(ev: EvaluatorLike, node: Node) -> Sym:
    a = ev.operand(node, 0)
    return Sym(sympy.Not(a.expr), a.axes, a.shape)


def _where(ev: EvaluatorLike, node: Node) -> Sym:
    cond, a, b = ev.operand(node, 0), ev.operand(node, 1), ev.operand(node, 2)
    (c, x, y), axes = broadcast(ev._shape(node), cond, a, b)
    return Sym(sympy.Piecewise((as_number(x), c), (as_number(y), True)), axes, ev._shape(node))


def _masked_fill(ev: EvaluatorLike, node: Node) -> Sym:
    x, mask, fill = ev.operand(node, 0), ev.operand(node, 1), ev.operand(node, 2)
    (v, m, f), axes = broadcast(ev._shape(node), x, mask, fill)
    return Sym(sympy.Piecewise((as_number(f), m), (as_number(v), True)), axes, ev._shape(node))


def _arange(ev: EvaluatorLike, node: Node) -> Sym:
    args = list(node.args)
    if len(args) == 1:
        args = [0, args[0]]
    bounds = dict(zip(("start", "end", "step"), args))
    bounds.update({k: v for k, v in node.kwargs.items() if k in ("start", "end", "step")})
    bounds = {"start": 0, "step": 1, **bounds}
    if not all(isinstance(bounds.get(k), int) and not isinstance(bounds.get(k), bool)
               for k in ("start", "end", "step")) or bounds["step"] == 0:
        raise Unproven("arange with tensor, non-integer or missing bounds")
    shape = ev._shape(node)
    start, end, step = bounds["start"], bounds["end"], bounds["step"]
    if shape != (max(0, -(-(end - start) // step)),):
        raise Unproven(f"{node.name}: arange({start}, {end}, {step}) does not match its recorded shape {shape}")
    index = ev.fresh_index("i")
    return _squeeze_singletons(Sym(start + step * index, (index,), shape))


def _reshape(ev: EvaluatorLike, node: Node) -> Sym:
    source = ev.operand(node, 0)
    shape = ev._shape(node)
    return _map_axes(source, shape, node.name)


def _map_axes(source: Sym, shape: tuple[int, ...], name: str) -> Sym:
    """Reshape: axes of size > 1 keep their tags when only singleton axes are added or removed;
    otherwise only the last axis may be kept (leading axes merged/split carry no index)."""
    big_in = [(s, t) for s, t in zip(source.shape, source.axes) if s != 1]
    big_out = [i for i, s in enumerate(shape) if s != 1]
    axes: list[Any] = [None] * len(shape)
    keeps_axes = [s for s, _ in big_in] == [shape[i] for i in big_out]
    if ROW in source.axes and not keeps_axes:
        raise Unproven(f"{name} reshapes {source.shape} -> {shape} across a per-row position's batch axis")
    if keeps_axes:
        for (_, tag), i in zip(big_in, big_out):
            axes[i] = tag
        return Sym(source.expr, tuple(axes), shape)
    if source.shape and shape and source.shape[-1] == shape[-1] \
            and all(index_symbol(t) is None for t in source.axes[:-1]):
        axes[-1] = source.axes[-1]
        if any(is_opaque(t) for t in source.axes[:-1]):
            axes[:-1] = [OPAQUE if s != 1 else None for s in shape[:-1]]
        return Sym(source.expr, tuple(axes), shape)
    raise Unproven(f"{name} reshapes {source.shape} -> {shape} across an indexed axis")


def _unsqueeze(ev: EvaluatorLike, node: Node) -> Sym:
    return _map_axes(ev.operand(node, 0), ev._shape(node), node.name)


def _expand(ev: EvaluatorLike, node: Node) -> Sym:
    source = ev.operand(node, 0)
    exprs, axes = broadcast(ev._shape(node), source)
    return Sym(exprs[0], axes, ev._shape(node))


def _getitem(ev: EvaluatorLike, node: Node) -> Sym:
    source = ev.operand(node, 0)
    index = node.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    return _index(ev, node, source, list(index))


def _aten_index(ev: EvaluatorLike, node: Node) -> Sym:
    return _index(ev, node, ev.operand(node, 0), [slice(None) if i is None else i for i in arg(node, 1)])


def _aten_slice(ev: EvaluatorLike, node: Node) -> Sym:
    source = ev.operand(node, 0)
    dim = arg(node, 1, 0)
    dim = dim + source.ndim if dim < 0 else dim
    items: list[Any] = [slice(None)] * dim + [slice(arg(node, 2), arg(node, 3), arg(node, 4, 1))]
    return _index(ev, node, source, items)


def _aten_select(ev: EvaluatorLike, node: Node) -> Sym:
    source = ev.operand(node, 0)
    dim = arg(node, 1)
    dim = dim + source.ndim if dim < 0 else dim
    return _index(ev, node, source, [slice(None)] * dim + [arg(node, 2)])


def _index(ev: EvaluatorLike, node: Node, source: Sym, items: list[Any]) -> Sym:
    """Basic and single-tensor indexing: None, full/prefix slices, ints, a scalar position tensor."""
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + [slice(None)] * (source.ndim - used) + items[at + 1:]
    expr, axes, dim, tensors = source.expr, [], 0, 0
    for item in items:
        if item is None:
            axes.append(None)
            continue
        if dim >= source.ndim:
            raise Unproven(f"{node.name} indexes more axes than its operand has")
        tag = source.axes[dim]
        symbol = index_symbol(tag)
        if tag == ROW and (not isinstance(item, slice) or (item.start or 0) != 0 or item.step not in (None, 1)
                           or (item.stop is not None and item.stop < source.shape[dim])):
            raise Unproven(f"{node.name} picks or shifts rows of a per-row position (a sequence's mask would use "
                           "another sequence's position)")
        if isinstance(item, slice):
            start, step = item.start or 0, 1 if item.step is None else item.step
            if not isinstance(start, int) or start < 0 or step != 1:
                raise Unproven(f"{node.name} slices with a step, a negative start or a tensor bound")
            if symbol is not None and start:
                expr = expr.subs(symbol, symbol + start)
            axes.append(tag)
        elif isinstance(item, int) or isinstance(item, Node):
            if isinstance(item, int):
                position = _const(item + source.shape[dim] if item < 0 else item)
            else:
                position = _position_index(ev, node, item, tensors)
                tensors += 1
            if is_opaque(tag):
                raise Unproven(f"{node.name} picks a row of a tensor whose content is not described")
            if symbol is not None:
                expr = expr.subs(symbol, position.expr if isinstance(position, Sym) else position)
            if isinstance(item, Node):  # a per-row position keeps its batch axis (``buffer[input_pos]``)
                axes.extend(position.axes if ROW in position.axes else [None] * position.ndim)
        else:
            raise Unproven(f"{node.name} uses an unsupported index {item!r}")
        dim += 1
    axes.extend(source.axes[dim:])
    shape = ev._shape(node)
    if len(axes) != len(shape):
        raise Unproven(f"{node.name}: could not follow the axes of the indexing")
    return _squeeze_singletons(Sym(expr, tuple(axes), shape))


def _position_index(ev: EvaluatorLike, node: Node, item: Node, earlier: int) -> Sym:
    """A tensor index: one single non-negative position (``x + c``, ``c >= 0``, ``x`` an input), or
    one per row (``[B]``, its batch axis kept: row ``b`` of the result is row ``pos[b]`` of the operand)."""
    position = _squeeze_singletons(ev.value(item, node))
    if earlier or any(t not in (None, ROW) for t in position.axes) or is_boolean(position.expr):
        raise Unproven(f"{node.name} indexes with a tensor that is not a single position")
    offset = position.expr - sum(position.expr.free_symbols)
    if len(position.expr.free_symbols) > 1 or not offset.is_number or offset < 0:
        raise Unproven(f"{node.name} indexes at {position.expr}, which may be negative (wraps around)")
    return position


def _full(ev: EvaluatorLike, node: Node) -> Sym:
    shape = ev._shape(node)
    return Sym(_const(arg(node, 1)), (None,) * len(shape), shape)


def _scalar_tensor(ev: EvaluatorLike, node: Node) -> Sym:
    return _scalar(arg(node, 0))


def _filled(value: int) -> Callable[[EvaluatorLike, Node], Sym]:
    def handler(ev: EvaluatorLike, node: Node) -> Sym:
        shape = ev._shape(node)
        return Sym(sympy.Integer(value), (None,) * len(shape), shape)

    return handler


def _triangle(lower: bool) -> Callable[[EvaluatorLike, Node], Sym]:
    """``tril``/``triu``: keep element ``(r, c)`` of the last two axes when ``c <= r + k``
    (``c >= r + k``), else 0; axes without an index symbol get a fresh one."""

    def handler(ev: EvaluatorLike, node: Node) -> Sym:
        source = ev.operand(node, 0)
        if source.ndim < 2:
            raise Unproven(f"{node.name}: tril/triu of a tensor with fewer than 2 axes")
        k = arg(node, 1, node.kwargs.get("diagonal", 0))
        if not isinstance(k, int):
            raise Unproven(f"{node.name}: tril/triu with a non-constant diagonal")
        axes, index = list(source.axes), []
        if ROW in axes[-2:]:
            raise Unproven(f"{node.name}: tril/triu across a per-row position's batch axis")
        for i in (-2, -1):
            symbol = index_symbol(axes[i])
            if symbol is None:
                symbol = ev.fresh_index("t")
                axes[i] = (symbol, OPAQUE) if is_opaque(axes[i]) else symbol
            index.append(symbol)
        row, col = index
        keep = sympy.Le(col, row + k) if lower else sympy.Ge(col, row + k)
        if is_boolean(source.expr):
            expr = sympy.And(source.expr, keep)
        else:
            expr = sympy.Piecewise((source.expr, keep), (0, True))
        return _squeeze_singletons(Sym(expr, tuple(axes), ev._shape(node)))

    return handler


def _copy(ev: EvaluatorLike, node: Node) -> Sym:
    """``dst.copy_(src)`` evaluates to ``src`` broadcast to ``dst``'s shape."""
    exprs, axes = broadcast(ev._shape(node), ev.operand(node, 1))
    return Sym(exprs[0], axes, ev._shape(node))


HANDLERS: dict[str, Callable[[EvaluatorLike, Node], Sym]] = {
    "identity": _identity, "cast": _cast,
    "add": _binary(operator.add), "sub": _binary(operator.sub), "mul": _binary(operator.mul),
    "div": _binary(operator.truediv), "neg": _neg, "mod": _binary(sympy.Mod),
    "le": _binary(sympy.Le, True), "lt": _binary(sympy.Lt, True), "ge": _binary(sympy.Ge, True),
    "gt": _binary(sympy.Gt, True), "eq": _binary(sympy.Eq, True), "ne": _binary(sympy.Ne, True),
    "not": _not, "and": _binary(sympy.And, True), "or": _binary(sympy.Or, True),
    "where": _where, "masked_fill": _masked_fill, "arange": _arange, "reshape": _reshape,
    "unsqueeze": _unsqueeze, "expand": _expand, "getitem": _getitem, "index": _aten_index,
    "slice": _aten_slice, "select": _aten_select, "full": _full, "scalar_tensor": _scalar_tensor,
    "zeros": _filled(0), "ones": _filled(1), "copy_": _copy, "tril": _triangle(True), "triu": _triangle(False),
}
