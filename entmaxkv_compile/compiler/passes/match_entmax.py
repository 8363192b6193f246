"""Find the attention-weight computations of a graph: entmax markers, softmax, hand-written entmax.

Known entmax functions reach the graph as the marker op ``entmaxkv.entmax`` (see ``capture.py``),
or ``entmaxkv.entmax_alpha`` when alpha is a tensor (``markers.py``).
Hand-written entmax (sort-based, bisection, sparsemax, any spelling) is recognised by its tail,
``p = [c*S - t]_+ ** beta`` (optionally divided by its row sum) with ``t`` a row function of the
scores ``S``, and is only accepted after the cut-out candidate reproduces
:func:`entmaxkv_compile.reference.entmax` on random scores. Softmax is reported, never rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ...math import reference
from .ir import PASS_THROUGH, ancestors, arg, as_number, concrete, dtype_of, op_of, shape_of
from .subgraph import try_extract

_POSITIVE_PART = ("clamp", "clamp_min", "relu")


@dataclass(frozen=True)
class WeightsSite:
    """Where attention weights are computed: ``probs = f(scores)`` along ``dim``."""

    probs: Node
    scores: Node
    kind: str  # "marker", "hand-written" or "softmax"
    alpha: Optional[float]
    dim: Optional[int]
    confirmed: bool
    reason: str = ""
    alpha_tensor: Optional[Node] = None  # ``entmaxkv.entmax_alpha``: the tensor alpha (``alpha`` is then None)


def find_weight_sites(gm: GraphModule, *, seed: int = 0) -> list[WeightsSite]:
    """Every entmax marker, softmax and numerically confirmed hand-written entmax in ``gm``.

    Hand-written candidates that fail the numeric check are returned with ``confirmed=False`` and
    the reason, so ``explain`` can show them; the passes only rewrite confirmed sites.
    """
    sites: list[WeightsSite] = []
    seen: set[Node] = set()
    for node in gm.graph.nodes:
        kind = op_of(node)
        if kind == "entmax":
            sites.append(WeightsSite(node, arg(node, 0), "marker", float(arg(node, 1)), arg(node, 2, -1), True))
            seen.add(node)
        elif kind == "entmax_alpha":
            sites.append(WeightsSite(node, arg(node, 0), "marker", None, arg(node, 2, -1), True,
                                     alpha_tensor=arg(node, 1)))
            seen.add(node)
        elif kind == "softmax":
            sites.append(WeightsSite(node, arg(node, 0), "softmax", None, arg(node, 1), False,
                                     "softmax attention is never rewritten"))
            seen.add(node)
    for node in gm.graph.nodes:
        if op_of(node) not in ("matmul", "einsum"):
            continue
        left = _unview(_weights_operand(node))
        if left is None or left in seen:
            continue
        tail = _entmax_tail(left)
        if tail is None:
            continue
        seen.add(left)
        scores, beta = tail
        alpha = 1.0 + 1.0 / beta
        ok, reason = confirm_entmax(gm, scores, left, alpha, seed=seed)
        sites.append(WeightsSite(left, scores, "hand-written", alpha, -1, ok, reason))
    return sites


def _weights_operand(matmul: Node) -> Optional[Node]:
    operands = matmul.args
    if op_of(matmul) == "einsum":  # einsum(equation, a, b) or einsum(equation, [a, b])
        rest = matmul.args[1:]
        operands = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    if not operands or not isinstance(operands[0], Node):
        return None
    return operands[0]


def _unview(node: Optional[Node]) -> Optional[Node]:
    """Through the views a post-dispatch graph puts between the weights and ``bmm``."""
    while op_of(node) in ("reshape", "expand") or op_of(node) in PASS_THROUGH:
        node = arg(node, 0)
    return node if isinstance(node, Node) else None


def _peel(node: Node) -> Node:
    while op_of(node) in PASS_THROUGH and isinstance(arg(node, 0), Node):
        node = arg(node, 0)
    return node


def _entmax_tail(probs: Node) -> Optional[tuple[Node, float]]:
    """``(scores, beta)`` when ``probs`` ends like ``[c*S - t]_+ ** beta (/ row sum)``."""
    node = _peel(probs)
    if op_of(node) == "div" and isinstance(arg(node, 1), Node) and arg(node, 0) in ancestors(arg(node, 1)):
        node = _peel(arg(node, 0))
    beta = 1.0
    if op_of(node) == "pow" and as_number(arg(node, 1)) is not None:
        beta = as_number(arg(node, 1))
        node = _peel(arg(node, 0))
    elif op_of(node) == "mul" and len(node.args) == 2 and node.args[0] is node.args[1]:
        beta, node = 2.0, _peel(node.args[0])
    if beta <= 0 or not _is_positive_part(node):
        return None
    shifted = _peel(arg(node, 0))
    if op_of(shifted) != "sub" or not isinstance(arg(shifted, 1), Node):
        return None
    threshold = arg(shifted, 1)
    scores = _scores_root(arg(shifted, 0))
    if scores is None or scores not in ancestors(threshold) | {threshold}:
        return None
    return scores, beta


def _is_positive_part(node: Node) -> bool:
    kind = op_of(node)
    if kind == "relu":
        return True
    if kind == "clamp":
        return as_number(arg(node, 1)) == 0.0 and arg(node, 2) is None
    if kind == "clamp_min":
        return as_number(arg(node, 1)) == 0.0
    return False


def _scores_root(node: Any) -> Optional[Node]:
    """Walk back through scalings and row shifts (``x - max(x)``) to the raw scores."""
    if not isinstance(node, Node):
        return None
    while True:
        node = _peel(node)
        kind = op_of(node)
        first = arg(node, 0)
        if kind in ("mul", "div") and isinstance(first, Node) and as_number(arg(node, 1)) is not None:
            node = first
        elif kind == "mul" and as_number(first) is not None and isinstance(arg(node, 1), Node):
            node = arg(node, 1)
        elif kind == "sub" and isinstance(first, Node) and isinstance(arg(node, 1), Node) \
                and first in ancestors(arg(node, 1)):
            node = first
        else:
            return node


def confirm_entmax(
    gm: GraphModule, scores: Node, probs: Node, alpha: float, *, seed: int = 0, trials: int = 3
) -> tuple[bool, str]:
    """Run the cut-out ``scores -> probs`` subgraph on random scores against the reference."""
    sub, why = try_extract(gm, [scores], probs)
    if sub is None:
        return False, f"candidate entmax tail could not be isolated: {why}"
    shape = shape_of(scores)
    dtype = dtype_of(scores) or torch.float32
    if shape is None:
        return False, "candidate entmax scores have no recorded shape"
    device = scores.meta.get("example_value", scores.meta.get("val")).device
    if device.type == "meta":
        device = torch.device("cpu")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    size = [concrete(s) for s in shape]
    for trial in range(trials):
        x = (torch.randn(size, generator=generator, dtype=torch.float64) * (0.5, 3.0, 12.0)[trial % 3])
        x = x.to(dtype)
        try:
            got = sub(x.to(device))
        except Exception as exc:  # a candidate that cannot run on its own is not confirmed
            return False, f"candidate entmax failed to run on random scores: {type(exc).__name__}: {exc}"
        want = reference.entmax(x.double(), alpha, -1)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return False, "candidate entmax output has the wrong shape"
        err = (got.detach().double().cpu() - want).abs().max().item()
        if not err <= tol:
            return False, f"not entmax with alpha={alpha:g}: max |p - reference| = {err:.3g} on random scores"
    return True, ""
