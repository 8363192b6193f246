"""Match ``weights = f(scale * q @ k^T + bias); out = weights @ v`` around a weights site.

Scores may come from ``@``/matmul/bmm (with ``k.transpose(-2, -1)`` or ``.mT``), einsum
(``...qd,...kd->...qk``) or baddbmm (its ``input`` is the bias, its ``alpha`` the scale); the scale
may multiply/divide the scores or be pre-applied to q; additive masks and biases, ``masked_fill``
and ``where`` are walked through (their values are checked numerically later, see ``verify.py``).
A logit soft-cap ``a * tanh(b * scores)`` (Gemma-2's ``cap * tanh(s / cap)``, also spelled
``tanh(s * (1/cap)) * cap``), with ``a > 0`` and ``b`` graph constants and the additive mask
outside it, is read as the cap ``a`` over scores of scale ``a * b * scale``: ``a tanh(b s) =
a tanh((a b s) / a)`` exactly, whatever split of ``b`` between the cap and the score scale the
model wrote. A mask or bias under the tanh is refused (masked scores would become ``-a``, not
``-inf``: they are not hidden).
3-D bmm operands that are reshapes of ``[B, H, T, D]`` tensors are followed back to the 4-D ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch.fx import Node

from .ir import PASS_THROUGH, ancestors, arg, as_number, ndim_of, normalize_dim, op_of, shape_of
from .match_entmax import WeightsSite
from .match_kv_write import CacheRead, trace_cache

_SCORE_PRODUCERS = ("matmul", "einsum", "baddbmm")


@dataclass
class AttentionMatch:
    """One attention site: the nodes and constants the decode rewrite needs."""

    weights: WeightsSite
    out: Optional[Node] = None
    q: Optional[Node] = None
    k_read: Optional[Node] = None
    v_read: Optional[Node] = None
    scale: float = 1.0
    k: CacheRead = field(default_factory=lambda: CacheRead(None))
    v: CacheRead = field(default_factory=lambda: CacheRead(None))
    has_bias: bool = False
    product: Optional[Node] = None  # the q.k product (matmul, einsum or baddbmm) under the scores
    softcap: float = 0.0  # the logit soft-cap a of ``a * tanh(...)`` (0: none)
    capped: Optional[Node] = None  # the soft-capped scores (the node ``a * tanh(...)``), when capped
    refusal: str = ""

    @property
    def score_node(self) -> Optional[Node]:
        """The node the mask proof reads as the product: the capped scores when the site is
        soft-capped (the mask is added after the cap), else the q.k product."""
        return self.capped if self.capped is not None else self.product


def match_attention(site: WeightsSite) -> AttentionMatch:
    """Fill an :class:`AttentionMatch` for ``site``, or set ``refusal`` to the reason it is not one."""
    match = AttentionMatch(site)
    ndim = ndim_of(site.scores)
    if normalize_dim(site.dim, ndim) != (ndim - 1 if ndim else None):
        match.refusal = f"weights are not taken over the last (key) axis (dim={site.dim})"
        return match
    out, v_read = _weights_times_v(site.probs)
    if out is None:
        match.refusal = "attention weights are not multiplied by V"
        return match
    match.out, match.v_read = out, _to_4d(v_read)
    producer, scale, has_bias, why, cap = _score_producer(site.scores)
    if producer is None:
        match.refusal = why
        return match
    match.product = producer
    if cap is not None:
        match.softcap, match.capped = cap
    q, k_read, extra_scale, why = _q_and_k(producer)
    if q is None:
        match.refusal = why
        return match
    q, q_scale = _prescaled(q)
    match.q, match.k_read = _to_4d(q), _to_4d(k_read)
    match.scale = scale * extra_scale * q_scale
    match.has_bias = has_bias
    for name in ("q", "k_read", "v_read"):
        if ndim_of(getattr(match, name)) != 4:
            match.refusal = f"{name.split('_')[0]} is not a [B, H, T, D] tensor"
            return match
    match.k = trace_cache(match.k_read, before=out)
    match.v = trace_cache(match.v_read, before=out)
    match.refusal = match.k.refusal or match.v.refusal
    if not match.refusal and match.k.cache is match.v.cache and (match.k.part is None or match.k.part == match.v.part):
        match.refusal = "K and V are read from the same buffer (not two parts kv[0], kv[1] of a fused buffer)"
    return match


def _weights_times_v(probs: Node) -> tuple[Optional[Node], Optional[Node]]:
    """The ``weights @ v`` node using ``probs`` (through casts/dropout) and its V operand."""
    todo = [probs]
    while todo:
        node = todo.pop()
        for user in node.users:
            kind = op_of(user)
            if kind in PASS_THROUGH or (kind == "reshape" and user.args[0] is node):
                todo.append(user)
            elif kind == "matmul" and user.args[0] is node:
                return user, user.args[1]
            elif kind == "einsum":
                operands = _einsum_operands(user)
                if operands and operands[0] is node and _einsum_role(user) == "pv":
                    return user, operands[1]
    return None, None


def _score_producer(scores: Node) -> tuple[Optional[Node], float, bool, str, Optional[tuple[float, Node]]]:
    """Walk from the weights' input to the q.k product; collect the scalar scale and biases.

    Returns ``(product, scale, has_bias, refusal, cap)``; ``cap`` is ``(a, node)`` for a soft-cap
    ``a * tanh(...)`` met on the way (``node`` the capped scores), and ``scale`` is then the scale of
    the raw scores under the cap (see the module doc).
    """
    node, scale, has_bias = scores, 1.0, False
    outer: Optional[tuple[float, Node]] = None  # (factor outside the tanh, the capped node) once met
    top = scores  # the highest node since the last bias: the capped scores when a tanh follows
    while True:
        kind = op_of(node)
        first = arg(node, 0)
        if kind in _SCORE_PRODUCERS:
            if outer is None:
                return node, scale, has_bias, "", None
            return node, scale * outer[0], has_bias, "", outer
        if kind == "tanh" and isinstance(first, Node):
            if outer is not None:
                return None, scale, has_bias, "soft-capped scores: more than one tanh between q @ k^T and entmax", None
            if not scale > 0:
                return None, scale, has_bias, (f"soft-capped scores: the factor outside tanh ({scale:g}) is not a "
                                               "positive constant (cap * tanh(s / cap) needs cap > 0)"), None
            outer, scale, node = (scale, top), 1.0, first
            continue
        if outer is not None and kind in ("add", "sub", "masked_fill", "where"):
            return None, scale, has_bias, ("soft-capped scores: an additive mask or bias inside the tanh (masked "
                                           "scores would become -cap, not -inf); add the mask after the cap, as "
                                           "Gemma-2 does"), None
        if kind in PASS_THROUGH or (kind == "reshape" and isinstance(first, Node)):
            node = first
        elif kind in ("mul", "div") and as_number(arg(node, 1)) is not None and isinstance(first, Node):
            factor = as_number(arg(node, 1))
            scale = scale * factor if kind == "mul" else scale / factor
            node = first
        elif kind == "mul" and as_number(first) is not None and isinstance(arg(node, 1), Node):
            scale, node = scale * as_number(first), arg(node, 1)
        elif kind in ("add", "sub") and isinstance(first, Node):
            other = arg(node, 1)
            if _leads_to_product(first):
                node, has_bias = first, True
            elif kind == "add" and isinstance(other, Node) and _leads_to_product(other):
                node, has_bias = other, True
            else:
                return None, scale, has_bias, "no q @ k^T product found under the scores", None
            top = node
        elif kind == "masked_fill":
            node, has_bias = first, True
            top = node
        elif kind == "where":
            a, b = arg(node, 1), arg(node, 2)
            node = a if isinstance(a, Node) and _leads_to_product(a) else b
            has_bias = True
            if not isinstance(node, Node):
                return None, scale, has_bias, "no q @ k^T product found under the scores", None
            top = node
        elif kind in ("mul", "div") and (outer is not None or _under_tanh(node)):
            side = "inside" if outer is not None else "outside"
            factors = [a for a in node.args if not (isinstance(a, Node) and _leads_to_product(a))]
            what = ", ".join(a.name if isinstance(a, Node) else repr(a) for a in factors) or node.name
            return None, scale, has_bias, (f"soft-capped scores: the cap's factor {side} tanh ({what}) is not "
                                           "a graph constant"), None
        else:
            what = kind or (node.format_node() if isinstance(node, Node) else repr(node))
            return None, scale, has_bias, f"scores are not q @ k^T with scale/bias (reached {what})", None


def _under_tanh(node: Node) -> bool:
    """Whether a tanh lies on ``node``'s path to the q.k product (a soft-cap around or below it)."""
    return any(op_of(n) == "tanh" and _leads_to_product(n) for n in ancestors(node) | {node})


def _leads_to_product(node: Node) -> bool:
    nodes = ancestors(node) | {node}
    return any(op_of(n) in _SCORE_PRODUCERS for n in nodes)


def _q_and_k(producer: Node) -> tuple[Optional[Node], Optional[Node], float, str]:
    """``(q, k, scale)`` with ``k`` un-transposed to ``[..., N, D]``."""
    kind = op_of(producer)
    if kind == "einsum":
        operands = _einsum_operands(producer)
        if _einsum_role(producer) != "qk" or not operands:
            return None, None, 1.0, f"einsum {producer.args[0]!r} is not q.k over the last axis"
        return operands[0], operands[1], 1.0, ""
    if kind == "baddbmm":
        q, kt = arg(producer, 1), arg(producer, 2)
        scale = as_number(producer.kwargs.get("alpha", 1.0))
        if scale is None:
            return None, None, 1.0, "baddbmm alpha is not a constant"
        k = _untranspose(kt)
        return (q, k, scale, "") if k is not None else (None, None, 1.0, "baddbmm batch2 is not k^T")
    q, kt = producer.args[0], producer.args[1]
    k = _untranspose(kt)
    if k is None:
        return None, None, 1.0, "the score matmul's second operand is not k^T"
    return q, k, 1.0, ""


def _untranspose(node: Any) -> Optional[Node]:
    """``k`` for ``k.transpose(-2, -1)``, ``k.transpose(2, 3)``, ``k.permute(0, 1, 3, 2)``, ``k.mT``."""
    node = _peel(node)
    kind = op_of(node)
    ndim = ndim_of(node)
    if kind == "transpose" and ndim is not None:
        dims = {normalize_dim(arg(node, 1), ndim), normalize_dim(arg(node, 2), ndim)}
        if dims == {ndim - 2, ndim - 1}:
            return arg(node, 0)
    if kind == "permute" and ndim is not None:
        order = node.args[1:] if len(node.args) > 2 else arg(node, 1)
        order = [normalize_dim(d, ndim) for d in order]
        if order == list(range(ndim - 2)) + [ndim - 1, ndim - 2]:
            return arg(node, 0)
    if isinstance(node, Node) and node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr" \
            and node.args[1] == "mT":
        return node.args[0]
    return None


def _prescaled(q: Node) -> tuple[Node, float]:
    """Fold a scalar multiply/divide applied to q before the product into the scale."""
    node = _peel(q)
    kind = op_of(node)
    if kind in ("mul", "div") and as_number(arg(node, 1)) is not None and isinstance(arg(node, 0), Node):
        factor = as_number(arg(node, 1))
        return arg(node, 0), factor if kind == "mul" else 1.0 / factor
    if kind == "mul" and as_number(arg(node, 0)) is not None and isinstance(arg(node, 1), Node):
        return arg(node, 1), as_number(arg(node, 0))
    return q, 1.0


def _to_4d(node: Any) -> Any:
    """The ``[B, H, T, D]`` tensor behind a ``[B*H, T, D]`` reshape (bmm spellings)."""
    peeled = _peel(node)
    if ndim_of(peeled) == 3 and op_of(peeled) == "reshape":
        source = _peel(arg(peeled, 0))
        shape, target = shape_of(source), shape_of(peeled)
        if shape is not None and len(shape) == 4 and target is not None and shape[2:] == target[1:]:
            return source
    return node


def _peel(node: Any) -> Any:
    while op_of(node) in PASS_THROUGH and isinstance(arg(node, 0), Node):
        node = arg(node, 0)
    return node


def _einsum_operands(node: Node) -> list[Any]:
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = rest[0]
    return list(rest)


def _einsum_role(node: Node) -> Optional[str]:
    """``"qk"`` for ``xyqd,xykd->xyqk``, ``"pv"`` for ``xyqk,xykd->xyqd`` (any letters), else None."""
    equation = node.args[0] if isinstance(node.args[0], str) else None
    if equation is None or "->" not in equation or "." in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or any(len(p) != 4 for p in (*parts, output)):
        return None
    a, b = parts
    if a[:2] != b[:2] or output[:2] != a[:2]:
        return None
    if a[3] == b[3] and output[2:] == a[2] + b[2] and len(set(a[2] + b[2] + a[3])) == 3:
        return "qk"
    if a[3] == b[2] and output[2:] == a[2] + b[3] and len(set(a[2] + a[3] + b[3])) == 3:
        return "pv"
    return None
