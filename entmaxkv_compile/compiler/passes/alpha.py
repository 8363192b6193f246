"""A per-head alpha (``entmaxkv.entmax_alpha``): one constant for every head, or refused.

``decode_step`` takes one alpha. A tensor alpha is accepted only when it provably holds one value:
it must be a graph input (a parameter or buffer) or a ``full`` factory, reached through views
(``view``/``reshape``, ``expand``, ``unsqueeze``, casts), and every element of its compile-time value
must be that one value. For an input, a run-time :class:`~.guards.StateGuard` (the same tensor, not
modified in place since) keeps it so at every later call; a learned alpha updated by an optimizer
fails the guard and that call runs the model's own attention. Anything else (an alpha computed in
the graph, heads with different alphas) is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from .guards import StateGuard
from .ir import PASS_THROUGH, arg, as_number, op_of

PER_HEAD_REASON = "per-head alpha: decode_step takes one alpha"
_VIEWS = frozenset({"reshape", "expand", "unsqueeze", "flatten"})


@dataclass(frozen=True)
class ConstantAlpha:
    """The outcome: ``alpha`` when every head's alpha is that constant (under ``guard``), else ``reason``."""

    alpha: Optional[float] = None
    guard: Optional[StateGuard] = None
    reason: str = ""


def constant_alpha(gm: GraphModule, node: Any, example: dict[Node, Any]) -> ConstantAlpha:
    """Whether the tensor alpha ``node`` is one constant for every head (see the module doc)."""
    source = node
    while isinstance(source, Node) and (op_of(source) in PASS_THROUGH or op_of(source) in _VIEWS):
        source = arg(source, 0)
    if not isinstance(source, Node):
        return ConstantAlpha(reason=f"{PER_HEAD_REASON}, and its alpha tensor is not a graph value")
    if getattr(source.target, "__name__", "") == "full" and as_number(arg(source, 1)) is not None:
        return _checked(torch.tensor(as_number(arg(source, 1))), None)
    if source.op == "get_attr":
        value: Any = gm
        for part in str(source.target).split("."):
            value = getattr(value, part)
        return _checked(value, None)
    if source.op == "placeholder":
        value = example.get(source)
        index = [n for n in gm.graph.nodes if n.op == "placeholder"].index(source)
        guard = StateGuard.of(index, value, f"alpha input {source.name} unchanged") \
            if isinstance(value, torch.Tensor) and _is_real(value) else None
        return _checked(value, guard)
    what = op_of(source) or str(source.target)
    return ConstantAlpha(reason=f"{PER_HEAD_REASON}, and this alpha is computed in the graph ({what}): it is not "
                                "provably one constant")


def _is_real(value: torch.Tensor) -> bool:
    return value.device.type != "meta" and type(value).__name__ != "FakeTensor"


def _checked(value: Any, guard: Optional[StateGuard]) -> ConstantAlpha:
    if not isinstance(value, torch.Tensor) or not _is_real(value):
        return ConstantAlpha(reason=f"{PER_HEAD_REASON}, and the alpha tensor has no value at compile time")
    flat = value.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        return ConstantAlpha(reason=f"{PER_HEAD_REASON}, and the alpha tensor is empty or not finite")
    first = float(flat[0])
    if not bool((flat == first).all()):
        values = ", ".join(f"{float(v):.4g}" for v in flat.unique()[:4])
        return ConstantAlpha(reason=f"{PER_HEAD_REASON} (the heads' alphas differ: {values})")
    if first <= 1.0:
        return ConstantAlpha(reason=f"alpha {first:g} is not > 1: not sparse entmax")
    return ConstantAlpha(first, guard)
