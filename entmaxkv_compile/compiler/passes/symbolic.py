"""Symbolic evaluation of the position-dependent part of a decode graph (masks, biases, indices).

The decode rewrite replaces ``entmax(scale * q.k + bias) @ v`` by ``decode_step`` with
``seqlens = position + 1``. That is right for *every* call of the compiled graph only if the bias
is, as a function of the key index ``j`` and of the position, the causal mask (ALiBi allowed) and
the cache is written at that position. Those are properties of the graph, so they are read from
it: this module evaluates the nodes between the graph's inputs and the scores into sympy
expressions, never running them on one example.

Every tensor becomes a :class:`Sym`: a sympy expression of its *element* plus, per axis, what the
element's value depends on along that axis:

- an **index symbol** (``torch.arange`` along the key axis, the row/column of a 2-D mask buffer):
  the element at index ``i`` of that axis is the expression with the symbol replaced by ``i``.
  Broadcasting two axes that carry different index symbols identifies them; indexing an axis with
  a scalar position substitutes the position (``causal_mask[None, None, input_pos]``);
- ``OPAQUE``: the values vary along that axis in a way not described (an input or buffer whose
  content is not part of the proof, e.g. per-head ALiBi slopes).

Scalar integer graph inputs become integer symbols (the positions). The q.k product is the real
symbol :data:`QK`, so the scores read ``scale * QK + bias(j, positions)``. Anything the evaluator
does not understand raises :class:`Unproven` with the reason, and the site is refused.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import sympy
import torch
from torch.fx import Node

from .ir import arg, op_of, shape_of

OPAQUE = "opaque"
QK = sympy.Symbol("qk", real=True, finite=True)


class Unproven(ValueError):
    """The graph does not let the property be proved; the message says why."""


@dataclass(frozen=True)
class Sym:
    """A tensor as ``expr`` (of one element) and, per axis, the index symbol or OPAQUE (or None)."""

    expr: Any
    axes: tuple[Any, ...]
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def is_boolean(expr: Any) -> bool:
    """Whether ``expr`` is a truth value (a sympy Symbol is also a Boolean: it is not one here)."""
    return isinstance(expr, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction,
                             sympy.logic.boolalg.BooleanAtom))


def as_number(expr: Any) -> Any:
    """A Boolean as 0/1 (what ``.to(float)`` or arithmetic on a mask does)."""
    if is_boolean(expr):
        return sympy.Piecewise((1, expr), (0, True))
    return expr


def _const(value: Any) -> Any:
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, float):
        if math.isinf(value):
            return sympy.oo if value > 0 else -sympy.oo
        if math.isnan(value):
            raise Unproven("a NaN constant in the mask")
        return sympy.Float(value)
    raise Unproven(f"unsupported constant {value!r}")


def _scalar(value: Any) -> Sym:
    return Sym(_const(value), (), ())


_COMPARE = {"le": sympy.Le, "lt": sympy.Lt, "ge": sympy.Ge, "gt": sympy.Gt, "eq": sympy.Eq, "ne": sympy.Ne}
_EXTRA_FUNCTIONS: dict[Any, str] = {
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq",
    operator.ne: "ne", torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt", torch.eq: "eq",
    torch.ne: "ne", operator.invert: "not", torch.logical_not: "not", torch.bitwise_not: "not",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and", operator.or_: "or",
    torch.logical_or: "or", torch.bitwise_or: "or", operator.mod: "mod", torch.remainder: "mod",
    torch.arange: "arange", torch.unsqueeze: "unsqueeze", torch.ones: "ones", torch.zeros: "zeros",
    torch.full: "full", torch.tril: "tril", torch.triu: "triu",
}
_EXTRA_METHODS = {
    "le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne", "__le__": "le", "__lt__": "lt",
    "__ge__": "ge", "__gt__": "gt", "logical_not": "not", "bitwise_not": "not", "__invert__": "not",
    "logical_and": "and", "__and__": "and", "logical_or": "or", "__or__": "or", "remainder": "mod",
    "__mod__": "mod", "bool": "cast", "long": "cast", "int": "cast", "view": "reshape", "expand": "expand",
    "tril": "tril", "triu": "triu",
}
_EXTRA_ATEN = {
    "le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne", "bitwise_not": "not",
    "logical_not": "not", "bitwise_and": "and", "logical_and": "and", "bitwise_or": "or", "logical_or": "or",
    "remainder": "mod", "arange": "arange", "index": "index", "slice": "slice", "select": "select",
    "type_as": "cast", "lift_fresh_copy": "identity", "scalar_tensor": "scalar_tensor", "full": "full",
    "zeros": "zeros", "ones": "ones", "__and__": "and", "__or__": "or", "tril": "tril", "triu": "triu",
}
#: Operations whose result never shares memory with an input (everything else may be a view).
FRESH = frozenset({
    "add", "sub", "mul", "div", "neg", "mod", "le", "lt", "ge", "gt", "eq", "ne", "not", "and", "or", "where",
    "masked_fill", "arange", "full", "zeros", "ones", "scalar_tensor", "tril", "triu", "matmul", "einsum",
    "baddbmm", "index", "entmax", "softmax", "cat", "pow", "clamp", "clamp_min", "relu",
})


def kind_of(node: Any) -> Optional[str]:
    """The canonical operation of ``node`` for the evaluator (``ir.op_of`` plus masks' ops)."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_method" and node.target in _EXTRA_METHODS:
        return _EXTRA_METHODS[node.target]
    if node.op == "call_function":
        target = node.target
        try:
            name = _EXTRA_FUNCTIONS.get(target)
        except TypeError:
            name = None
        if name is not None:
            return name
        packet = getattr(target, "overloadpacket", None)
        if packet is not None and getattr(packet, "_qualified_op_name", "").startswith("aten::"):
            name = _EXTRA_ATEN.get(packet.__name__)
            if name is not None:
                return name
    return op_of(node)


class Evaluator:
    """Evaluates nodes of one graph into :class:`Sym` (memoized).

    ``leaf`` decides what a graph input is (called with the placeholder/get_attr node and the node
    reading it); ``product`` is the node to read as :data:`QK` (the q.k matmul of the site).
    """

    def __init__(self, leaf: Callable[[Node, Node], Sym], product: Optional[Node] = None,
                 product_axis: Any = None, check_read: Optional[Callable[[Node, Node], None]] = None) -> None:
        self.leaf = leaf
        self.check_read = check_read
        self.product = product
        self.product_axis = product_axis
        self.memo: dict[Node, Sym] = {}
        self._fresh = 0

    def fresh_index(self, name: str) -> sympy.Symbol:
        self._fresh += 1
        return sympy.Symbol(f"{name}{self._fresh}", integer=True)

    def value(self, x: Any, reader: Optional[Node] = None) -> Sym:
        if not isinstance(x, Node):
            return _scalar(x)
        if self.check_read is not None and reader is not None:
            self.check_read(x, reader)
        if x.op in ("placeholder", "get_attr"):
            return self.leaf(x, reader)
        if x not in self.memo:
            self.memo[x] = self._eval(x)
        return self.memo[x]

    def _shape(self, node: Node) -> tuple[int, ...]:
        shape = shape_of(node)
        if shape is None:
            raise Unproven(f"no shape recorded for {node.name}")
        if not all(isinstance(s, int) for s in shape):
            raise Unproven(f"{node.name} has a symbolic shape {shape}")
        return tuple(shape)

    def _eval(self, node: Node) -> Sym:
        if node is self.product:
            return self._product(node)
        kind = kind_of(node)
        handler = _HANDLERS.get(kind or "")
        if handler is None:
            what = kind or (getattr(node.target, "__name__", None) or str(node.target))
            raise Unproven(f"the mask/position is computed by an operation the proof does not model ({what})")
        return handler(self, node)

    def _product(self, node: Node) -> Sym:
        """``QK`` along the key axis; baddbmm adds its input: ``beta * input + alpha * QK``."""
        shape = self._shape(node)
        qk = Sym(QK, (None,) * (len(shape) - 1) + (self.product_axis,), shape)
        if kind_of(node) != "baddbmm":
            return qk
        (bias, product), axes = broadcast(shape, self.operand(node, 0), qk)
        alpha, beta = _const(node.kwargs.get("alpha", 1)), _const(node.kwargs.get("beta", 1))
        return Sym(beta * as_number(bias) + alpha * product, axes, shape)

    def operand(self, node: Node, index: int) -> Sym:
        return self.value(arg(node, index), node)


# ---------------------------------------------------------------- broadcasting and axis bookkeeping


def _squeeze_singletons(sym: Sym) -> Sym:
    """An index symbol on an axis of size 1 only takes the value 0."""
    expr, axes = sym.expr, list(sym.axes)
    for i, (size, tag) in enumerate(zip(sym.shape, axes)):
        if size == 1 and tag is not None:
            if isinstance(tag, sympy.Symbol):
                expr = expr.subs(tag, 0)
            axes[i] = None
    return Sym(expr, tuple(axes), sym.shape)


def broadcast(out_shape: tuple[int, ...], *syms: Sym) -> tuple[list[Any], tuple[Any, ...]]:
    """Align ``syms`` to ``out_shape`` (right-aligned); unify index symbols sharing an axis."""
    syms = tuple(_squeeze_singletons(s) for s in syms)
    n = len(out_shape)
    axes: list[Any] = [None] * n
    exprs = [s.expr for s in syms]
    for k, s in enumerate(syms):
        offset = n - s.ndim
        for i, tag in enumerate(s.axes):
            if tag is None:
                continue
            j = offset + i
            current = axes[j]
            if current is None or current == tag:
                axes[j] = tag
            elif tag == OPAQUE or current == OPAQUE:
                axes[j] = _merge_opaque(current, tag)
            else:  # two index symbols on one axis: they index the same elements
                exprs = [e.subs(tag, current) for e in exprs]
    return exprs, tuple(axes)


def _merge_opaque(current: Any, tag: Any) -> Any:
    """An axis that is both indexed and opaque: keep the index symbol, mark the mix in the tag."""
    index = current if isinstance(current, sympy.Symbol) else tag
    return (index, OPAQUE) if isinstance(index, sympy.Symbol) else OPAQUE


def index_symbol(tag: Any) -> Optional[sympy.Symbol]:
    if isinstance(tag, sympy.Symbol):
        return tag
    if isinstance(tag, tuple):
        return tag[0]
    return None


def is_opaque(tag: Any) -> bool:
    return tag == OPAQUE or (isinstance(tag, tuple) and OPAQUE in tag)


# ------------------------------------------------------------------------------------- handlers


def _identity(ev: Evaluator, node: Node) -> Sym:
    source = ev.operand(node, 0)
    shape = ev._shape(node)
    if shape != source.shape:
        raise Unproven(f"{node.name} changes the shape {source.shape} -> {shape}")
    return source


def _cast(ev: Evaluator, node: Node) -> Sym:
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


def _binary(fn: Callable[[Any, Any], Any], boolean: bool = False) -> Callable[[Evaluator, Node], Sym]:
    def handler(ev: Evaluator, node: Node) -> Sym:
        a, b = ev.operand(node, 0), ev.operand(node, 1)
        (x, y), axes = broadcast(ev._shape(node), a, b)
        if not boolean:
            x, y = as_number(x), as_number(y)
        return Sym(fn(x, y), axes, ev._shape(node))

    return handler


def _neg(ev: Evaluator, node: Node) -> Sym:
    a = ev.operand(node, 0)
    return Sym(-as_number(a.expr), a.axes, a.shape)


def _not(ev: Evaluator, node: Node) -> Sym:
    a = ev.operand(node, 0)
    return Sym(sympy.Not(a.expr), a.axes, a.shape)


def _where(ev: Evaluator, node: Node) -> Sym:
    cond, a, b = ev.operand(node, 0), ev.operand(node, 1), ev.operand(node, 2)
    (c, x, y), axes = broadcast(ev._shape(node), cond, a, b)
    return Sym(sympy.Piecewise((as_number(x), c), (as_number(y), True)), axes, ev._shape(node))


def _masked_fill(ev: Evaluator, node: Node) -> Sym:
    x, mask, fill = ev.operand(node, 0), ev.operand(node, 1), ev.operand(node, 2)
    (v, m, f), axes = broadcast(ev._shape(node), x, mask, fill)
    return Sym(sympy.Piecewise((as_number(f), m), (as_number(v), True)), axes, ev._shape(node))


def _arange(ev: Evaluator, node: Node) -> Sym:
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


def _reshape(ev: Evaluator, node: Node) -> Sym:
    source = ev.operand(node, 0)
    shape = ev._shape(node)
    return _map_axes(source, shape, node.name)


def _map_axes(source: Sym, shape: tuple[int, ...], name: str) -> Sym:
    """Reshape: axes of size > 1 keep their tags when only singleton axes are added or removed;
    otherwise only the last axis may be kept (leading axes merged/split carry no index)."""
    big_in = [(s, t) for s, t in zip(source.shape, source.axes) if s != 1]
    big_out = [i for i, s in enumerate(shape) if s != 1]
    axes: list[Any] = [None] * len(shape)
    if [s for s, _ in big_in] == [shape[i] for i in big_out]:
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


def _unsqueeze(ev: Evaluator, node: Node) -> Sym:
    return _map_axes(ev.operand(node, 0), ev._shape(node), node.name)


def _expand(ev: Evaluator, node: Node) -> Sym:
    source = ev.operand(node, 0)
    exprs, axes = broadcast(ev._shape(node), source)
    return Sym(exprs[0], axes, ev._shape(node))


def _getitem(ev: Evaluator, node: Node) -> Sym:
    source = ev.operand(node, 0)
    index = node.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    return _index(ev, node, source, list(index))


def _aten_index(ev: Evaluator, node: Node) -> Sym:
    return _index(ev, node, ev.operand(node, 0), [slice(None) if i is None else i for i in arg(node, 1)])


def _aten_slice(ev: Evaluator, node: Node) -> Sym:
    source = ev.operand(node, 0)
    dim = arg(node, 1, 0)
    dim = dim + source.ndim if dim < 0 else dim
    items: list[Any] = [slice(None)] * dim + [slice(arg(node, 2), arg(node, 3), arg(node, 4, 1))]
    return _index(ev, node, source, items)


def _aten_select(ev: Evaluator, node: Node) -> Sym:
    source = ev.operand(node, 0)
    dim = arg(node, 1)
    dim = dim + source.ndim if dim < 0 else dim
    return _index(ev, node, source, [slice(None)] * dim + [arg(node, 2)])


def _index(ev: Evaluator, node: Node, source: Sym, items: list[Any]) -> Sym:
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
            if isinstance(item, Node):
                axes.extend([None] * position.ndim)
        else:
            raise Unproven(f"{node.name} uses an unsupported index {item!r}")
        dim += 1
    axes.extend(source.axes[dim:])
    shape = ev._shape(node)
    if len(axes) != len(shape):
        raise Unproven(f"{node.name}: could not follow the axes of the indexing")
    return _squeeze_singletons(Sym(expr, tuple(axes), shape))


def _position_index(ev: Evaluator, node: Node, item: Node, earlier: int) -> Sym:
    """A tensor index: one single non-negative position (``x + c``, ``c >= 0``, ``x`` an input)."""
    position = ev.value(item, node)
    if earlier or any(t is not None for t in _squeeze_singletons(position).axes) or is_boolean(position.expr):
        raise Unproven(f"{node.name} indexes with a tensor that is not a single position")
    offset = position.expr - sum(position.expr.free_symbols)
    if len(position.expr.free_symbols) > 1 or not offset.is_number or offset < 0:
        raise Unproven(f"{node.name} indexes at {position.expr}, which may be negative (wraps around)")
    return position


def _full(ev: Evaluator, node: Node) -> Sym:
    shape = ev._shape(node)
    return Sym(_const(arg(node, 1)), (None,) * len(shape), shape)


def _scalar_tensor(ev: Evaluator, node: Node) -> Sym:
    return _scalar(arg(node, 0))


def _filled(value: int) -> Callable[[Evaluator, Node], Sym]:
    def handler(ev: Evaluator, node: Node) -> Sym:
        shape = ev._shape(node)
        return Sym(sympy.Integer(value), (None,) * len(shape), shape)

    return handler


def _triangle(lower: bool) -> Callable[[Evaluator, Node], Sym]:
    """``tril``/``triu``: keep element ``(r, c)`` of the last two axes when ``c <= r + k``
    (``c >= r + k``), else 0; axes without an index symbol get a fresh one."""

    def handler(ev: Evaluator, node: Node) -> Sym:
        source = ev.operand(node, 0)
        if source.ndim < 2:
            raise Unproven(f"{node.name}: tril/triu of a tensor with fewer than 2 axes")
        k = arg(node, 1, node.kwargs.get("diagonal", 0))
        if not isinstance(k, int):
            raise Unproven(f"{node.name}: tril/triu with a non-constant diagonal")
        axes, index = list(source.axes), []
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


def _copy(ev: Evaluator, node: Node) -> Sym:
    """``dst.copy_(src)`` evaluates to ``src`` broadcast to ``dst``'s shape."""
    exprs, axes = broadcast(ev._shape(node), ev.operand(node, 1))
    return Sym(exprs[0], axes, ev._shape(node))


_HANDLERS: dict[str, Callable[[Evaluator, Node], Sym]] = {
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
