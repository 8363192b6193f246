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
  content is not part of the proof, e.g. per-head ALiBi slopes);
- ``ROW``: the batch axis of a per-row position (``input_pos [B]`` of a ragged decode step). The
  position's symbol stands for *row b's* position, for a generic row ``b``; that is sound only
  while every ``ROW`` axis of a value is one and the same batch axis, so an operation that would
  move, merge, pick or shift rows, or meet another tag on that axis, raises :class:`Unproven`.

Scalar integer graph inputs become integer symbols (the positions). The q.k product is the real
symbol :data:`QK`, so the scores read ``scale * QK + bias(j, positions)``. Anything the evaluator
does not understand raises :class:`Unproven` with the reason, and the site is refused.

This module holds the values (:class:`Sym`) and their broadcasting; ``symbolic_ops.py`` the rule
of each modelled op; ``evaluator.py`` the :class:`~.evaluator.Evaluator` that walks a graph.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import sympy
import torch
from torch.fx import Node

from .ir import op_of

OPAQUE = "opaque"
ROW = "row"
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
    "expand_as": "expand",
    "tril": "tril", "triu": "triu",
}
_EXTRA_ATEN = {
    "le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne", "bitwise_not": "not",
    "logical_not": "not", "bitwise_and": "and", "logical_and": "and", "bitwise_or": "or", "logical_or": "or",
    "remainder": "mod", "arange": "arange", "index": "index", "slice": "slice", "select": "select",
    "type_as": "cast", "lift_fresh_copy": "identity", "scalar_tensor": "scalar_tensor", "full": "full",
    "zeros": "zeros", "ones": "ones", "__and__": "and", "__or__": "or", "tril": "tril", "triu": "triu",
    "expand_as": "expand",
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


# ---------------------------------------------------------------- broadcasting and axis bookkeeping


def _squeeze_singletons(sym: Sym) -> Sym:
    """An index symbol on an axis of size 1 only takes the value 0."""
    expr, axes = sym.expr, list(sym.axes)
    for i, (size, tag) in enumerate(zip(sym.shape, axes)):
        if size == 1 and tag == ROW:
            raise Unproven("a per-row position on an axis of size 1")
        if size == 1 and tag is not None:
            if isinstance(tag, sympy.Symbol):
                expr = expr.subs(tag, 0)
            axes[i] = None
    return Sym(expr, tuple(axes), sym.shape)


def broadcast(out_shape: tuple[int, ...], *syms: Sym) -> tuple[list[Any], tuple[Any, ...]]:
    """Align ``syms`` to ``out_shape`` (right-aligned); unify index symbols sharing an axis."""
    syms = tuple(_squeeze_singletons(s) for s in syms)
    n = len(out_shape)
    rows = {n - s.ndim + i for s in syms for i, tag in enumerate(s.axes) if tag == ROW}
    if len(rows) > 1:
        raise Unproven("per-row positions on two different axes (rows of different sequences combined)")
    axes: list[Any] = [None] * n
    exprs = [s.expr for s in syms]
    for k, s in enumerate(syms):
        offset = n - s.ndim
        for i, tag in enumerate(s.axes):
            if tag is None:
                continue
            j = offset + i
            current = axes[j]
            if ROW in (current, tag) and current not in (None, tag):
                raise Unproven("a per-row position meets another index on the batch axis")
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


class EvaluatorLike(Protocol):
    """What an op rule needs from the evaluator (``evaluator.Evaluator``)."""

    def operand(self, node: Node, index: int) -> Sym: ...

    def value(self, x: Any, reader: Optional[Node] = None) -> Sym: ...

    def fresh_index(self, name: str) -> sympy.Symbol: ...

    def _shape(self, node: Node) -> tuple[int, ...]: ...
