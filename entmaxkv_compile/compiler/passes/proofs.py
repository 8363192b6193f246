"""Prove, from the graph, that a decode site's rewrite is right at every position.

``decode_step`` attends keys ``0..w`` of the cache (``seqlens = w + 1``, ``w`` the index the step
writes at) with scores ``scale * q.k + slope_h * (j - w)``. The model's own scores, read
symbolically (``symbolic.py``), must equal that up to a per-row constant for every key index
``j`` and every write index ``w`` in ``[0, N)``:

1. **Write index.** K and V are written at the same index ``W``, an expression of the graph's
   integer inputs. The mask must be built from the same value: ``W`` itself, or ``x + c`` when
   ``W = x + c`` (HF's ``arange(1) + cumulative_length``). A cache written at ``input_pos % S``
   under a mask of ``input_pos`` (a rolling buffer) is refused.
2. **Mask.** The scores become a piecewise expression whose conditions must be comparisons
   ``a*(j - w) + k``, ``a*j + k`` or ``a*w + k`` against 0. Those split the integer box
   ``0 <= j, w < N`` into finitely many cells in which every condition is constant; each cell is
   decided exactly: where ``j <= w`` the scores must be ``c * q.k + A*(j - w) + C(w)`` with one
   expression on all such cells (``A`` per head: ALiBi), where ``j > w`` they must be hidden
   (``-inf``, or a bias at most :data:`MASK_FLOOR`). A sliding window fails the first rule (a
   cell ``j <= w - window`` is hidden), a model without a mask the second.
3. **Ragged batches.** An integer input of shape ``[B]`` (B the cache's batch) is a per-row
   position: its symbol is row ``b``'s own position, for a generic row ``b``, carried on the batch
   axis (``symbolic.ROW``). The write must pair it with the row index (``buf[rows, :, pos] = x``,
   ``rows`` proved to be ``arange(B)``) and the scores may vary with it only along their batch
   axis; then 1. and 2. above hold for each row with ``w = pos[b]``, every row independently
   (``seqlens = pos + 1`` per row). Masks that are graph inputs are refused with per-row positions.
4. **Inputs.** A 2-D bool/float buffer indexed by the position (gpt-fast's
   ``causal_mask[None, None, input_pos]``) is accepted when its *whole content* is lower
   triangular (shown: ``c <= r``, hidden after), with a guard that the buffer is not modified
   later; a mask that is a graph input is assumed causal under a per-call :class:`MaskGuard`
   (when the example hides a prefix of some row, left padding, the guard accepts a hidden prefix
   per row and the rewrite passes its length to ``decode_step`` as ``row_start``: the proof of
   the causal part is unchanged, the prefix is what ``row_start`` removes);
   other inputs may only vary along non-key axes (ALiBi slopes per head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch
from torch.fx import GraphModule, Node

from .guards import MASK_FLOOR, Guard, MaskGuard, StateGuard, leading_hidden
from .ir import concrete, dtype_of, is_impure
from .match_attention import AttentionMatch
from .subgraph import NotExtractable, extract, needed_placeholders
from .evaluator import Evaluator
from .symbolic import FRESH, QK, ROW, Sym, Unproven, kind_of
from .write_index import J, W, in_write_index, write_index



@dataclass
class SiteProof:
    """The outcome for one decode site: ``reason`` empty when proved (under ``guards``)."""

    reason: str = ""
    guards: list[Guard] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    row_start_mask: Optional[Node] = None  # the mask input whose hidden prefix is decode_step's row_start


class _Leaves:
    """What each graph input is for the proof; records the guards and notes it needs."""

    def __init__(self, gm: GraphModule, example: dict[Node, Any], key_len: int, batch: Any = None) -> None:
        self.gm, self.example, self.key_len, self.batch = gm, example, key_len, batch
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self.alias, self.mutations = _memory(gm)
        self.positions: dict[sympy.Symbol, Node] = {}
        self.per_row: set[sympy.Symbol] = set()  # positions of shape [B]: one per sequence
        self.opaque_bound: dict[sympy.Symbol, float] = {}
        self.guards: list[Guard] = []
        self.notes: list[str] = []
        self.mask_inputs: list[Node] = []
        self.ev: Optional[Evaluator] = None

    def evaluator(self, product: Optional[Node] = None, axis: Any = None) -> Evaluator:
        self.ev = Evaluator(self, product, axis, self.check_read)
        return self.ev

    def check_read(self, value: Node, reader: Node) -> None:
        """Refuse a read of ``value`` after an in-place write to its memory (its graph value is stale)."""
        root = _find(self.alias, value)
        for mutation in self.mutations:
            if _find(self.alias, mutation.args[0]) is root and \
                    self.order[value] < self.order[mutation] < self.order[reader]:
                raise Unproven(f"{value.name} is modified in place by {mutation.name} before {reader.name} reads it")

    def _value(self, node: Node) -> Any:
        if node.op == "get_attr":
            target: Any = self.gm
            for part in str(node.target).split("."):
                target = getattr(target, part)
            return target
        return self.example.get(node, node.meta.get("example_value", node.meta.get("val")))

    def __call__(self, node: Node, reader: Optional[Node]) -> Sym:
        value = self._value(node)
        if not isinstance(value, torch.Tensor):
            raise Unproven(f"input {node.name} is not a tensor")
        shape = tuple(concrete(s) for s in value.shape)
        if not value.dtype.is_floating_point and value.dtype != torch.bool:
            per_row = isinstance(self.batch, int) and self.batch > 1 and shape == (self.batch,)
            if value.numel() != 1 and not per_row:
                raise Unproven(f"integer input {node.name} holds more than one position (and is not one per row)")
            symbol = sympy.Symbol(node.name, integer=True)
            self.positions[symbol] = node
            if per_row:
                self.per_row.add(symbol)
                return Sym(symbol, (ROW,), shape)
            return Sym(symbol, (None,) * len(shape), shape)
        if len(shape) == 2 and min(shape) >= self.key_len and _is_real(value):
            proved = _triangular(value)
            if proved is not None:
                return self._causal_buffer(node, value, shape, proved)
        if len(shape) >= 2 and shape[-2] == 1 and shape[-1] >= self.key_len >= 2 and node.op == "placeholder":
            return self._guarded_mask(node, value, shape)
        return self._opaque(node, value, shape)

    def _causal_buffer(self, node: Node, value: torch.Tensor, shape, hidden: Any) -> Sym:
        row, col = self.ev.fresh_index("r"), self.ev.fresh_index("c")
        shown = sympy.Le(col, row)
        expr = shown if value.dtype == torch.bool else sympy.Piecewise((0, shown), (hidden, True))
        self._state_guard(node, value, f"mask buffer {node.name} unchanged")
        self.notes.append(f"mask buffer {node.name} proved lower triangular")
        return Sym(expr, (row, col), shape)

    def _guarded_mask(self, node: Node, value: torch.Tensor, shape) -> Sym:
        index = self.ev.fresh_index("m")
        shown = sympy.Le(index, W)
        expr = shown if value.dtype == torch.bool else sympy.Piecewise((0, shown), (MASK_FLOOR, True))
        if node not in self.mask_inputs:
            self.mask_inputs.append(node)
        return Sym(expr, (None,) * (len(shape) - 1) + (index,), shape)

    def _opaque(self, node: Node, value: torch.Tensor, shape) -> Sym:
        symbol = sympy.Symbol(f"in_{node.name}", real=True, finite=True)
        if not _is_real(value):
            raise Unproven(f"input {node.name} has no value to bound")
        finite = value.detach().to(torch.float64)
        if not bool(torch.isfinite(finite).all()):
            raise Unproven(f"input {node.name} is not known to be finite")
        self.opaque_bound[symbol] = float(finite.abs().max()) if finite.numel() else 0.0
        self._state_guard(node, value, f"input {node.name} unchanged")
        return Sym(symbol, tuple("opaque" if s != 1 else None for s in shape), shape)

    def _state_guard(self, node: Node, value: torch.Tensor, text: str) -> None:
        if node.op == "placeholder" and _is_real(value):
            guard = StateGuard.of(self.index[node], value, text)
            if guard not in self.guards:
                self.guards.append(guard)


def _is_fake(value: torch.Tensor) -> bool:
    return type(value).__name__ == "FakeTensor"


def _is_real(value: torch.Tensor) -> bool:
    return value.device.type != "meta" and not _is_fake(value)


def _triangular(value: torch.Tensor) -> Any:
    """For a 2-D buffer shown exactly on ``col <= row``: the hidden value (sympy), else None."""
    shown = torch.ones(value.shape, dtype=torch.bool, device=value.device).tril()
    if value.dtype == torch.bool:
        return sympy.false if torch.equal(value, shown) else None
    if not bool((value[shown] == 0).all()):
        return None
    rest = value[~shown]
    if rest.numel() == 0:
        return -sympy.oo
    top = float(rest.max())
    return (-sympy.oo if top == -math.inf else sympy.Float(top)) if top <= MASK_FLOOR else None


def _memory(gm: GraphModule) -> tuple[dict[Node, Node], list[Node]]:
    """Alias classes (union-find: every op not known to return fresh memory may be a view of its
    first input) and the in-place writes of the graph."""
    parent: dict[Node, Node] = {}
    mutations = []
    for node in gm.graph.nodes:
        first = next(iter(node.all_input_nodes), None)
        if node.op in ("call_function", "call_method") and first is not None:
            if kind_of(node) not in FRESH:
                parent[_find(parent, node)] = _find(parent, first)
            if is_impure(node):
                mutations.append(node)
    return parent, mutations


def _find(parent: dict[Node, Node], node: Node) -> Node:
    while node in parent:
        node = parent[node]
    return node


def prove_decode_site(gm: GraphModule, match: AttentionMatch, product: Node, example: dict[Node, Any],
                      allow_guards: bool) -> SiteProof:
    """Prove ``match``'s rewrite right for every position, or say why not (see the module doc)."""
    shape = match.k.shape()
    if shape is None or not isinstance(shape[2], int):
        return SiteProof("the cache length is not a static size: cannot prove the mask for every position")
    key_len = shape[2]
    try:
        leaves = _Leaves(gm, example, key_len, shape[0])
        write = write_index(leaves, match)
        scores = leaves.evaluator(product, J).value(match.weights.scores)
        expr = in_write_index(scores, write, leaves)
        decide_causal(expr, key_len, leaves.opaque_bound)
        if leaves.per_row and leaves.mask_inputs:
            raise Unproven("the attention mask is a graph input and the positions are per row: the run-time "
                           "mask check takes one position shared by the batch")
        guards = list(leaves.guards)
        padded = [node for node in leaves.mask_inputs if _hides_a_prefix(example.get(node), key_len)]
        if len(padded) > 1:
            raise Unproven("two attention mask inputs hide a prefix of the keys: decode_step takes one row_start")
        for node in leaves.mask_inputs:
            guards.append(_mask_guard(gm, leaves, node, match, key_len, prefix=node in padded))
    except Unproven as why:
        return SiteProof(str(why))
    except (TypeError, ValueError, AttributeError, sympy.SympifyError) as error:  # never rewrite on a crash
        return SiteProof(f"the proof could not be carried out ({type(error).__name__}: {error})")
    notes = list(leaves.notes)
    if leaves.mask_inputs:
        if not allow_guards:
            names = ", ".join(n.name for n in leaves.mask_inputs)
            return SiteProof(f"the attention mask is a graph input ({names}): it can only be checked per call, "
                             "which needs the torch.compile backend (the offline rewrite has no run-time guards)")
        notes.append("mask input " + ", ".join(n.name for n in leaves.mask_inputs) + " checked causal at each call")
    if padded:
        notes.append(f"left padding: row_start = the leading hidden keys of mask input {padded[0].name}, "
                     "checked at each call")
    return SiteProof("", guards, notes, padded[0] if padded else None)


def _hides_a_prefix(mask: Any, key_len: int) -> bool:
    """Whether the example mask hides the first key of some row (left padding). A graph compiled
    on such an example passes decode_step a row_start; one compiled on an unpadded example keeps
    the plain causal guard (a padded call then fails it and runs the model's attention)."""
    return isinstance(mask, torch.Tensor) and bool((leading_hidden(mask, key_len) > 0).any())


def decide_causal(expr: Any, n: int, bounds: Optional[dict[sympy.Symbol, float]] = None) -> None:
    """Decide that scores ``expr(J, W, QK, ...)`` are causal (ALiBi allowed) on ``0 <= J, W < n``.

    Raises :class:`Unproven` with a counterexample otherwise. ``bounds``: the magnitude of each
    opaque input symbol, used to check that a finite mask value stays hidden.
    """
    bounds = bounds or {}
    expr = sympy.piecewise_fold(expr)
    starts = {"d": {-(n - 1), 0, 1}, "j": {0}, "w": {0}}
    for atom in expr.atoms(sympy.core.relational.Relational):
        var, t = _threshold(atom)
        if var is not None:
            starts[var].update(_cuts(t))
    limits = {"d": (-(n - 1), n - 1), "j": (0, n - 1), "w": (0, n - 1)}
    intervals = {v: _intervals(starts[v], *limits[v]) for v in limits}
    points = [_point(*d, *j, *w) for d in intervals["d"] for j in intervals["j"] for w in intervals["w"]]
    visible: Optional[tuple[Any, Any]] = None
    failures = []
    for j0, w0 in sorted(p for p in points if p is not None):
        try:
            value = _branch(expr, j0, w0)
            if j0 <= w0:
                visible = _check_visible(value, j0, w0, visible)
            else:
                _check_hidden(value, j0, w0, n, bounds)
        except Unproven as why:
            failures.append((w0, abs(j0 - w0), why))
    if failures:  # report the first position where the rewrite would go wrong
        raise min(failures, key=lambda f: f[:2])[2]


def _threshold(atom: Any) -> tuple[Optional[str], Any]:
    diff = sympy.expand(atom.lhs - atom.rhs)
    if not diff.free_symbols & {J, W}:
        if diff.free_symbols:
            raise Unproven(f"the mask compares data, not indices ({atom})")
        return None, None
    try:
        poly = sympy.Poly(diff, J, W)
    except sympy.PolynomialError:
        poly = None
    if poly is None or poly.total_degree() > 1 or not all(c.is_number for c in poly.coeffs()):
        raise Unproven(f"the mask condition {atom} is not a comparison of key index and position with a constant")
    a, b = poly.coeff_monomial(J), poly.coeff_monomial(W)
    k = poly.coeff_monomial(1)
    if a != 0 and b == -a:
        return "d", -k / a
    if a != 0 and b == 0:
        return "j", -k / a
    if a == 0 and b != 0:
        return "w", -k / b
    raise Unproven(f"the mask condition {atom} is not of the form key_index - position <= constant")


def _cuts(t: Any) -> set[int]:
    """Integer points where a condition on an integer variable with threshold ``t`` may flip."""
    t = sympy.nsimplify(t)
    if t.is_integer:
        return {int(t), int(t) + 1}
    return {int(sympy.floor(t)) + 1}


def _intervals(starts: set[int], low: int, high: int) -> list[tuple[int, int]]:
    points = sorted(s for s in starts | {low} if low <= s <= high)
    return [(s, (points[i + 1] - 1) if i + 1 < len(points) else high) for i, s in enumerate(points)]


def _point(dl, dh, jl, jh, wl, wh) -> Optional[tuple[int, int]]:
    """An integer ``(j, w)`` with ``j`` in [jl, jh], ``w`` in [wl, wh], ``j - w`` in [dl, dh].

    The one with ``j - w`` nearest 0 and the smallest ``w``: the first position a counterexample
    shows up at, which is what a refusal reports.
    """
    low, high = max(dl, jl - wh), min(dh, jh - wl)
    if low > high:
        return None
    d = high if high <= 0 else low
    w = max(wl, jl - d)
    return w + d, w


def _branch(expr: Any, j0: int, w0: int) -> Any:
    if not isinstance(expr, sympy.Piecewise):
        return expr
    for value, cond in expr.args:
        truth = cond.subs({J: j0, W: w0})
        if truth == sympy.true:
            return value
        if truth != sympy.false:
            raise Unproven(f"the mask condition {cond} is not decided by the key index and position")
    raise Unproven("the mask leaves some scores undefined")


def _split(value: Any) -> tuple[Any, Any]:
    """``(coefficient of q.k, the rest)`` with the rest free of q.k, else Unproven."""
    if value.has(sympy.nan, sympy.zoo):
        raise Unproven("the scores are undefined (NaN) for some key")
    a = sympy.diff(value, QK)
    rest = sympy.expand(value - a * QK)
    if not a.is_number or rest.has(QK):
        raise Unproven("the scores are not scale * q.k plus a bias")
    return a, rest


def _check_visible(value: Any, j0: int, w0: int, seen: Optional[tuple[Any, Any]]) -> tuple[Any, Any]:
    hidden_here = value.has(sympy.oo, -sympy.oo)
    if not hidden_here:
        a, bias = _split(value)
        hidden_here = a == 0 or (bias.is_number and bias <= MASK_FLOOR)
    if hidden_here:
        raise Unproven(f"the mask hides positions already written (key {j0} at position {w0}): a sliding "
                       "window or another mask the rewrite does not implement")
    slope = sympy.diff(bias, J)
    if slope.has(J) or slope.has(W):
        raise Unproven("the bias on visible keys is not linear in the key index (not ALiBi)")
    if seen is not None and (a != seen[0] or sympy.simplify(bias - seen[1]) != 0):
        raise Unproven(f"the scores differ between ranges of visible keys (key {j0} at position {w0}): "
                       "not one causal mask")
    return a, bias


def _check_hidden(value: Any, j0: int, w0: int, n: int, bounds: dict[sympy.Symbol, float]) -> None:
    if value == -sympy.oo:
        return
    why = (f"key {j0} is after position {w0} but not hidden: the model attends cache rows not yet written "
           "(no causal mask on the cache)")
    if value.has(sympy.oo):
        raise Unproven(why)
    _, bias = _split(value)
    constant, rest = bias.as_coeff_Add()
    if not constant.is_number or constant + _bound(rest, n, bounds) > MASK_FLOOR:
        raise Unproven(why)


def _bound(rest: Any, n: int, bounds: dict[sympy.Symbol, float]) -> float:
    """An upper bound of ``|rest|`` over the box (opaque inputs at their compile-time magnitude)."""
    total = 0.0
    for term in sympy.Add.make_args(rest):
        magnitude = 1.0
        for factor in sympy.Mul.make_args(term):
            if factor.is_number:
                magnitude *= abs(float(factor))
            elif factor in (J, W):
                magnitude *= n
            elif factor in bounds:
                magnitude *= bounds[factor]
            else:
                raise Unproven(f"cannot bound the bias term {term} on hidden keys")
        total += magnitude
    return total


def _mask_guard(gm: GraphModule, leaves: _Leaves, mask: Node, match: AttentionMatch, key_len: int,
                prefix: bool = False) -> MaskGuard:
    try:
        position = extract(gm, [], match.k.positions, allow_placeholders=True)
    except NotExtractable as why:
        raise Unproven(f"the mask is a graph input and the position cannot be computed to check it ({why})")
    args = tuple(leaves.index[n] for n in needed_placeholders(gm, [], match.k.positions))
    kind = "bool" if dtype_of(mask) == torch.bool else "additive"
    what = "causal after a per-row hidden prefix" if prefix else "causal"
    return MaskGuard(leaves.index[mask], key_len, position, args, f"{kind} mask input {mask.name} {what}", prefix)
