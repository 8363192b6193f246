"""The fallback of a guarded rewrite: the same graph with the bookkeeping but the model's attention.

When a run-time guard of a rewritten graph fails (``guards.py``), that call must compute what the
model computes. It cannot simply run the original graph: the page statistics would miss this
step's row and every later rewritten step would select pages from stale statistics. The fallback
is therefore the original graph with the same statistics updates inserted and no attention
replaced. It is planned from the rewrite's own plan, carried over to a copy of the graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.fx import Node

from .analyze import BOOKKEEPING, REWRITTEN, Plan


def _remap(obj: Any, mapping: dict[Node, Node]) -> Any:
    if isinstance(obj, Node):
        return mapping.get(obj, obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_remap(x, mapping) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _remap(getattr(obj, f.name), mapping) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def bookkeeping_only(plan: Plan, mapping: dict[Node, Node]) -> Plan:
    """``plan`` moved onto the graph copy described by ``mapping``, rewritten sites demoted to
    bookkeeping (their statistics append is kept, their attention is not replaced)."""
    actions = []
    for action in plan.actions:
        moved = _remap(action, mapping)
        if moved.site.status == REWRITTEN:
            moved.site.status = BOOKKEEPING
        actions.append(moved)
    return Plan(sites=[a.site for a in actions], actions=actions)
