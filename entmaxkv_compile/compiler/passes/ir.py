"""A normalized view of FX nodes, shared by Dynamo (torch-level) and torch.export (aten) graphs.

Dynamo graphs spell one operation many ways (``a @ b``, ``torch.matmul``, ``a.matmul(b)``,
``torch.bmm``) and export graphs use aten overloads (``aten.matmul.default``). The matchers only
ask :func:`op_of` for a canonical name and read arguments through :func:`arg`, so one pass library
serves both front doors.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import sympy
import torch
import torch.nn.functional as F
from torch.fx import Node

_FUNCTIONS: dict[Any, str] = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul", torch.mm: "matmul",
    torch.einsum: "einsum", torch.functional.einsum: "einsum", torch.baddbmm: "baddbmm",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    torch.true_divide: "div", operator.add: "add", torch.add: "add", operator.sub: "sub",
    torch.sub: "sub", operator.neg: "neg", torch.neg: "neg", operator.pow: "pow", torch.pow: "pow",
    torch.transpose: "transpose", torch.permute: "permute", torch.reshape: "reshape",
    torch.repeat_interleave: "repeat_interleave", torch.unsqueeze: "unsqueeze",
    F.softmax: "softmax", torch.softmax: "softmax", F.dropout: "dropout",
    operator.getitem: "getitem", operator.setitem: "setitem", torch.where: "where",
    torch.masked_fill: "masked_fill", torch.clamp: "clamp", torch.clamp_min: "clamp_min",
    torch.relu: "relu", F.relu: "relu", torch.cat: "cat", torch.concat: "cat",
    torch.index_copy: "index_copy", torch.index_put: "index_put", torch.flatten: "flatten",
    torch.select: "select", torch.scatter: "scatter", torch.tanh: "tanh", F.tanh: "tanh",
}

_METHODS: dict[str, str] = {
    "matmul": "matmul", "__matmul__": "matmul", "bmm": "matmul", "mm": "matmul",
    "mul": "mul", "__mul__": "mul", "div": "div", "__truediv__": "div", "add": "add",
    "__add__": "add", "sub": "sub", "__sub__": "sub", "neg": "neg", "pow": "pow", "__pow__": "pow",
    "transpose": "transpose", "permute": "permute", "reshape": "reshape", "view": "reshape",
    "expand": "expand", "unsqueeze": "unsqueeze", "repeat_interleave": "repeat_interleave",
    "softmax": "softmax", "masked_fill": "masked_fill", "clamp": "clamp", "clamp_min": "clamp_min",
    "relu": "relu", "contiguous": "identity", "clone": "identity", "float": "cast", "half": "cast",
    "bfloat16": "cast", "double": "cast", "to": "cast", "type_as": "cast", "type": "cast",
    "index_copy_": "index_copy_", "index_copy": "index_copy", "index_put_": "index_put_",
    "index_put": "index_put", "copy_": "copy_", "baddbmm": "baddbmm", "where": "where",
    "flatten": "flatten", "select": "select", "scatter_": "scatter_", "scatter": "scatter",
    "tanh": "tanh",
}

_ATEN: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "mm": "matmul", "einsum": "einsum", "baddbmm": "baddbmm",
    "mul": "mul", "div": "div", "add": "add", "sub": "sub", "neg": "neg", "pow": "pow",
    "transpose": "transpose", "permute": "permute", "view": "reshape", "reshape": "reshape",
    "_unsafe_view": "reshape", "expand": "expand", "unsqueeze": "unsqueeze",
    "repeat_interleave": "repeat_interleave", "_softmax": "softmax", "softmax": "softmax",
    "masked_fill": "masked_fill", "where": "where", "clamp": "clamp", "clamp_min": "clamp_min",
    "relu": "relu", "clone": "identity", "contiguous": "identity", "alias": "identity",
    "_to_copy": "cast", "to": "cast", "index_copy_": "index_copy_", "index_copy": "index_copy",
    "index_put_": "index_put_", "index_put": "index_put", "copy_": "copy_", "cat": "cat",
    "dropout": "dropout", "entmax": "entmax", "entmax_alpha": "entmax_alpha", "select": "select",
    "flatten": "flatten", "scatter_": "scatter_", "scatter": "scatter", "tanh": "tanh",
}

#: Ops that only move or re-type data: walking through them keeps "the same tensor".
PASS_THROUGH = frozenset({"identity", "cast", "dropout"})


def op_of(node: Any) -> Optional[str]:
    """The canonical name of ``node``'s operation, or ``None`` for anything the passes ignore."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op != "call_function":
        return None
    target = node.target
    name = _FUNCTIONS.get(target) if _hashable(target) else None
    if name is not None:
        return name
    packet = getattr(target, "overloadpacket", None) or target
    namespace = getattr(packet, "_qualified_op_name", "").split("::")[0]
    if namespace in ("aten", "entmaxkv"):
        return _ATEN.get(getattr(packet, "__name__", ""))
    if namespace == "" and getattr(target, "__name__", "") == "entmax" and "entmaxkv" in str(target):
        return "entmax"
    return None


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


_ARG_NAMES: dict[str, tuple[str, ...]] = {
    "softmax": ("input", "dim"),
    "entmax": ("x", "alpha", "dim"),
    "entmax_alpha": ("x", "alpha", "dim"),
    "transpose": ("input", "dim0", "dim1"),
    "repeat_interleave": ("input", "repeats", "dim"),
    "index_copy_": ("input", "dim", "index", "source"),
    "index_copy": ("input", "dim", "index", "source"),
    "index_put_": ("input", "indices", "values"),
    "index_put": ("input", "indices", "values"),
    "masked_fill": ("input", "mask", "value"),
    "where": ("condition", "input", "other"),
    "baddbmm": ("input", "batch1", "batch2"),
    "clamp": ("input", "min", "max"),
    "clamp_min": ("input", "min"),
    "pow": ("input", "exponent"),
    "cat": ("tensors", "dim"),
    "flatten": ("input", "start_dim", "end_dim"),
    "select": ("input", "dim", "index"),
}

_KWARG_ALIASES = {"input": ("input", "self", "x", "X"), "dim": ("dim", "dim0"), "exponent": ("exponent",)}


def arg(node: Node, index: int, default: Any = None) -> Any:
    """Argument ``index`` of ``node`` (positional or by its usual keyword name)."""
    if index < len(node.args):
        return node.args[index]
    names = _ARG_NAMES.get(op_of(node) or "", ())
    if index < len(names):
        for alias in _KWARG_ALIASES.get(names[index], (names[index],)):
            if alias in node.kwargs:
                return node.kwargs[alias]
    return default


def meta_value(node: Any) -> Any:
    """The fake tensor (or value) recorded for ``node`` by Dynamo or export, if any."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def shape_of(node: Any) -> Optional[tuple[Any, ...]]:
    value = meta_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def dtype_of(node: Any) -> Optional[torch.dtype]:
    value = meta_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def ndim_of(node: Any) -> Optional[int]:
    shape = shape_of(node)
    return None if shape is None else len(shape)


def as_number(value: Any) -> Optional[float]:
    """A Python float for an argument that is a number constant (not a bool, not a node)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def proves_equal(size: Any, value: int) -> bool:
    """True when a (possibly symbolic) size is provably ``value``: int compare, else sympy."""
    if isinstance(size, int):
        return size == value
    expr = getattr(getattr(size, "node", None), "expr", None)
    if expr is None:
        return False
    return sympy.simplify(sympy.sympify(expr) - value) == 0


def concrete(size: Any) -> int:
    """A concrete int for a size: itself, or the hint of a symbolic size."""
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    if hint is None and node is not None:
        hint = node.shape_env.size_hint(node.expr)
    return int(hint)


def normalize_dim(dim: Any, ndim: Optional[int]) -> Optional[int]:
    if not isinstance(dim, int) or ndim is None:
        return None
    return dim + ndim if dim < 0 else dim


def is_impure(node: Node) -> bool:
    """Whether ``node`` has a side effect (an in-place op, setitem, a mutating aten/custom op)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op != "call_function":
        return False
    if node.target is operator.setitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def ancestors(node: Node, stop: Iterable[Node] = ()) -> set[Node]:
    """Every node ``node`` depends on (not crossing ``stop``)."""
    stop = set(stop)
    seen: set[Node] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        for parent in current.all_input_nodes:
            if parent not in seen and parent not in stop:
                seen.add(parent)
                todo.append(parent)
    return seen


def where_of(node: Node) -> str:
    """A readable location for ``node``: the innermost module path, else the node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_module_path(str(path))
    return node.name


def _clean_module_path(path: str) -> str:
    for prefix in ("L['self'].", "L['self']", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    path = path.replace("._modules['", ".").replace("']", "").replace("['", ".")
    return path.strip(".") or "<model>"
