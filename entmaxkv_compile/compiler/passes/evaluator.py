"""The evaluator of the position-dependent part of a decode graph (see ``symbolic.py``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import sympy
from torch.fx import Node

from .ir import arg, shape_of
from .symbolic import QK, Sym, Unproven, _const, _scalar, as_number, broadcast, kind_of
from .symbolic_ops import HANDLERS

__all__ = ["Evaluator"]


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
        handler = HANDLERS.get(kind or "")
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
