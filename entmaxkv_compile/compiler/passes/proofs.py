"""Prove, from the graph, that a decode site's rewrite is right at every position.

``decode_step`` attends keys ``0..w`` of the cache (``seqlens = w + 1``, ``w`` the index the step
writes at) with scores ``scale * q.k + slope_h * (j - w)``. The model's own scores, read
symbolically (``symbolic.py``), must equal that up to a per-row constant for every key index
``j`` and every write index ``w`` in ``[0, N)``:

1. **Write index.** K and V are written at the same index ``W``, an expression of the graph's
   integer inputs. The mask must be built from the same value: ``W`` itself, or ``x + c`` when
   ``W = x + c`` (HF's ``arange(1) + cumulative_length``). A **rolling buffer** (Mistral) writes
   position ``x`` at slot ``x % S``, ``S`` exactly the cache's slot count (any other modulus is
   refused): its mask is read as a function of the position ``w = x``, and 2. is decided for every
   ``w >= 0``, not only ``w < S`` (``decide.py``). A causal mask over the slots (``j <= w``) then
   shows exactly the first ``min(w + 1, S)`` slots, every written one; entmax attention over a set
   of keys does not depend on their order (RoPE is applied before the write), so ``decode_step``
   attends ``seqlens = min(w + 1, S)`` slots. A window, an ALiBi bias or a mask input over a
   rolling buffer is refused (once wrapped, a slot no longer says its position).
2. **Mask.** The scores become a piecewise expression whose conditions must be comparisons
   ``a*(j - w) + k``, ``a*j + k`` or ``a*w + k`` against 0. Those split the integer box
   ``0 <= j, w < N`` into finitely many cells in which every condition is constant; each cell is
   decided exactly (``decide.py``): where ``j <= w`` the scores must be ``c * q.k + A*(j - w) + C(w)``
   with one expression on all shown cells (``A`` per head: ALiBi), except the written keys a
   sliding window hides (exactly ``w - j >= window`` for one constant ``window``: the rewrite then
   passes ``row_start = max(0, w - window + 1)``), where ``j > w`` they must be hidden (``-inf``, or
   a bias at most :data:`MASK_FLOOR`). A window with a hole is refused, a model without a mask too.
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
from .decide import decide_causal
from .evaluator import Evaluator
from .symbolic import FRESH, ROW, Sym, Unproven, kind_of
from .write_index import J, W, in_write_index, write_index

__all__ = ["J", "W", "SiteProof", "decide_causal", "prove_decode_site"]



@dataclass
class SiteProof:
    """The outcome for one decode site: ``reason`` empty when proved (under ``guards``)."""

    reason: str = ""
    guards: list[Guard] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    row_start_mask: Optional[Node] = None  # the mask input whose hidden prefix is decode_step's row_start
    window: Optional[int] = None  # a sliding window proved from the graph: row_start = max(0, w - window + 1)
    rolling: Optional[Node] = None  # a rolling buffer: the position input (the write is at its value % slots)


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
                      allow_guards: bool, always_row_start: bool = False) -> SiteProof:
    """Prove ``match``'s rewrite right for every position, or say why not (see the module doc).

    ``always_row_start``: every mask input's leading hidden keys become ``row_start`` (its guard
    accepts a hidden prefix per row), not only one whose example hides a prefix."""
    shape = match.k.shape()
    if shape is None or not isinstance(shape[2], int):
        return SiteProof("the cache length is not a static size: cannot prove the mask for every position")
    key_len = shape[2]
    try:
        leaves = _Leaves(gm, example, key_len, shape[0])
        write = write_index(leaves, match)
        scores = leaves.evaluator(product, J).value(match.weights.scores)
        expr, rolling = in_write_index(scores, write, leaves, key_len)
        window = decide_causal(expr, key_len, leaves.opaque_bound, rolling is not None)
        if rolling is not None and leaves.mask_inputs:
            raise Unproven("the attention mask is a graph input over a rolling buffer: its run-time check takes "
                           "the slot, not the position")
        if leaves.per_row and leaves.mask_inputs:
            raise Unproven("the attention mask is a graph input and the positions are per row: the run-time "
                           "mask check takes one position shared by the batch")
        guards = list(leaves.guards)
        padded = [node for node in leaves.mask_inputs
                  if always_row_start or _hides_a_prefix(example.get(node), key_len)]
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
    if window is not None:
        notes.append(f"sliding window {window}: proved from the mask for every position, "
                     f"row_start = max(0, position - {window - 1})")
    if rolling is not None:
        notes.append(f"rolling buffer of {key_len} slots written at position % {key_len}: proved for every "
                     f"position, seqlens = min(position + 1, {key_len}), the written slot's page statistics "
                     "rebuilt each step")
    if padded:
        notes.append(f"left padding: row_start = the leading hidden keys of mask input {padded[0].name} (its "
                     "padding, or a sliding window's start), checked at each call")
    return SiteProof("", guards, notes, padded[0] if padded else None, window,
                     leaves.positions[rolling] if rolling is not None else None)


def _hides_a_prefix(mask: Any, key_len: int) -> bool:
    """Whether the example mask hides the first key of some row (left padding). A graph compiled
    on such an example passes decode_step a row_start; one compiled on an unpadded example keeps
    the plain causal guard (a padded call then fails it and runs the model's attention)."""
    return isinstance(mask, torch.Tensor) and bool((leading_hidden(mask, key_len) > 0).any())


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
