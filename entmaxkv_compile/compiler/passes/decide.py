"""Decide, exactly, that symbolic scores are a causal (or sliding-window) mask at every position.

The scores are a sympy expression of the key index ``J``, the write index ``W`` (the position),
the q.k product ``QK`` and data symbols (``proofs.py`` builds it from the graph). Its conditions
must compare ``a*(j - w)``, ``a*j`` or ``a*w`` with a constant; their thresholds cut the integer
box ``0 <= j, w < n`` into finitely many cells on which every condition is constant, so deciding
each cell at one point decides the whole box:

- keys after the position (``j > w``) must be hidden (``-inf``, or a bias at most
  :data:`MASK_FLOOR`);
- keys at or before it are shown with one expression ``c * q.k + A*(j - w) + C(w)`` (``A`` per
  head: ALiBi; ``C`` a per-row constant, which entmax ignores), except that a **sliding window**
  may hide the keys far enough back: the hidden written keys must be exactly those with
  ``w - j >= window`` for one constant ``window`` (Mistral's ``w - window < j <= w``). The cells
  are classed by their range of ``j - w``; a window is accepted only when every hidden written
  cell lies strictly below every shown one, so the threshold is a function of ``j - w`` alone
  (a hole, a hidden first key or a window that depends on ``j`` or ``w`` alone is refused).
  ``decode_step`` then attends ``[max(0, w - window + 1), w]``: ``row_start`` is that start.

For a **rolling buffer** (``rolling=True``: ``j`` a slot of ``n``, ``w`` any position ``>= 0``)
the box's position axis runs past every cut by more than ``n`` (:func:`_rolling_limit`), so the
same cells decide every position; the causal rule then shows the first ``min(w + 1, n)`` slots,
and a window or a bias along the slots (ALiBi) is refused.
"""

from __future__ import annotations

from typing import Any, Optional

import sympy

from .guards import MASK_FLOOR
from .symbolic import QK, Unproven
from .write_index import J, W

_Cell = tuple[tuple[int, int], tuple[int, int]]  # a representative (j, w) and the cell's range of j - w


def decide_causal(expr: Any, n: int, bounds: Optional[dict[sympy.Symbol, float]] = None,
                  rolling: bool = False) -> Optional[int]:
    """Decide that scores ``expr(J, W, QK, ...)`` are causal (ALiBi allowed) on ``0 <= J, W < n``.

    Returns ``None`` for a causal mask, or the window ``W`` of a sliding window (key ``j`` shown
    at position ``w`` iff ``w - W < j <= w``) that hides some written key inside the box. Raises
    :class:`Unproven` with a counterexample otherwise. ``bounds``: the magnitude of each opaque
    input symbol, used to check that a finite mask value stays hidden.

    ``rolling``: ``J`` is a slot of a rolling buffer of ``n`` slots and ``W`` the position, any
    ``w >= 0`` (see :func:`_rolling_limit`): slot ``j`` is written iff ``j <= w``, so the same
    rule shows exactly the first ``min(w + 1, n)`` slots. A window (it would hide slots by
    position, which a slot no longer tells once wrapped) and an ALiBi bias (it needs each slot's
    position) are refused.
    """
    bounds = bounds or {}
    expr = sympy.piecewise_fold(expr)
    starts = {"d": {-(n - 1), 0, 1}, "j": {0}, "w": {0}}
    for atom in expr.atoms(sympy.core.relational.Relational):
        var, t = _threshold(atom)
        if var is not None:
            starts[var].update(_cuts(t))
    if rolling:
        _refuse_rolling_bias(expr)
    last = _rolling_limit(starts, n) if rolling else n - 1
    starts["d"].add(-last)
    limits = {"d": (-last, n - 1), "j": (0, n - 1), "w": (0, last)}
    intervals = {v: _intervals(starts[v], *limits[v]) for v in limits}
    cells = []
    for d in intervals["d"]:
        for j in intervals["j"]:
            for w in intervals["w"]:
                point = _point(*d, *j, *w)
                if point is not None:
                    cells.append((point, d))
    visible: Optional[tuple[Any, Any]] = None
    shown: list[_Cell] = []
    hidden_written: list[_Cell] = []
    failures = []
    for (j0, w0), d in sorted(cells):
        try:
            value = _branch(expr, j0, w0)
            if j0 > w0:
                _check_hidden(value, j0, w0, n, bounds, rolling)
            elif _is_hidden(value, n, bounds, rolling):
                hidden_written.append(((j0, w0), d))
            else:
                visible = _check_visible(value, j0, w0, visible)
                shown.append(((j0, w0), d))
        except Unproven as why:
            failures.append((w0, abs(j0 - w0), why))
    failures += _window_failures(shown, hidden_written)
    if rolling and not failures:
        failures += _rolling_failures(hidden_written)
    if failures:  # report the first position where the rewrite would go wrong
        raise min(failures, key=lambda f: f[:2])[2]
    if not hidden_written:
        return None
    return 1 - min(d[0] for _, d in shown)  # shown iff j - w >= 1 - window


def _rolling_limit(starts: dict[str, set[int]], n: int) -> int:
    """The last position to decide for a rolling buffer: past every cut of every condition by more
    than ``n``, so each cell that runs on to infinity (in ``w`` and, with it, down in ``j - w``)
    has a representative point below it, and deciding the cells up to it decides every ``w >= 0``."""
    reach = max(abs(c) for cuts in starts.values() for c in cuts)
    return 2 * (n + reach) + 1


def _refuse_rolling_bias(expr: Any) -> None:
    """A rolling buffer's scores may not vary with the slot but through the mask's conditions: a
    bias along the slots (ALiBi) needs each key's position, which a wrapped slot no longer says."""
    values = [value for value, _ in expr.args] if isinstance(expr, sympy.Piecewise) else [expr]
    if any(sympy.diff(value, J) != 0 for value in values):
        raise Unproven("an ALiBi bias over a rolling buffer is not supported: the bias needs each key's "
                       "position, and once the buffer wraps a slot no longer says it")


def _rolling_failures(hidden: list[_Cell]) -> list[tuple[int, int, Unproven]]:
    """A rolling buffer's extra rule: no written slot hidden (a window is not supported)."""
    if not hidden:
        return []
    (j0, w0), _ = min(hidden, key=lambda c: (c[0][1], c[0][1] - c[0][0]))
    return [(w0, w0 - j0, Unproven(
        f"the mask hides a written slot of the rolling buffer (slot {j0} at position {w0}): a sliding window "
        "over a rolling buffer is not supported (once wrapped, a slot no longer says its position)"))]


def _window_failures(shown: list[_Cell], hidden: list[_Cell]) -> list[tuple[int, int, Unproven]]:
    """The hidden written cells that break the sliding-window rule (none when it holds)."""
    if not hidden:
        return []
    if not shown:
        (j0, w0), _ = min(hidden, key=lambda c: (c[0][1], c[0][1] - c[0][0]))
        return [(w0, w0 - j0, Unproven(f"the mask hides every written key (key {j0} at position {w0})"))]
    lowest_shown = min(d[0] for _, d in shown)
    failures = []
    for (j0, w0), d in hidden:
        if d[1] >= lowest_shown:
            failures.append((w0, w0 - j0, Unproven(
                f"the mask hides positions already written (key {j0} at position {w0}) that a sliding window "
                "would show: a hole, or another mask the rewrite does not implement")))
    return failures


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
        raise Unproven(f"the mask hides positions already written (key {j0} at position {w0}) with a value that "
                       "is not a hidden key's (-inf or a bias at most -1e4)")
    slope = sympy.diff(bias, J)
    if slope.has(J) or slope.has(W):
        raise Unproven("the bias on visible keys is not linear in the key index (not ALiBi)")
    if seen is not None and (a != seen[0] or sympy.simplify(bias - seen[1]) != 0):
        raise Unproven(f"the scores differ between ranges of visible keys (key {j0} at position {w0}): "
                       "not one causal mask")
    return a, bias


def _is_hidden(value: Any, n: int, bounds: dict[sympy.Symbol, float], rolling: bool = False) -> bool:
    """Whether a key with scores ``value`` gets weight exactly 0 (see :func:`_check_hidden`)."""
    try:
        _check_hidden(value, 0, 0, n, bounds, rolling)
    except Unproven:
        return False
    return True


def _check_hidden(value: Any, j0: int, w0: int, n: int, bounds: dict[sympy.Symbol, float],
                  rolling: bool = False) -> None:
    if value == -sympy.oo:
        return
    why = (f"key {j0} is after position {w0} but not hidden: the model attends cache rows not yet written "
           "(no causal mask on the cache)")
    if value.has(sympy.oo):
        raise Unproven(why)
    _, bias = _split(value)
    constant, rest = bias.as_coeff_Add()
    if not constant.is_number or constant + _bound(rest, n, bounds, rolling) > MASK_FLOOR:
        raise Unproven(why)


def _bound(rest: Any, n: int, bounds: dict[sympy.Symbol, float], rolling: bool = False) -> float:
    """An upper bound of ``|rest|`` over the box (opaque inputs at their compile-time magnitude);
    with ``rolling`` the position is unbounded, so a term in it has no bound."""
    total = 0.0
    for term in sympy.Add.make_args(rest):
        magnitude = 1.0
        for factor in sympy.Mul.make_args(term):
            if factor.is_number:
                magnitude *= abs(float(factor))
            elif factor == W and rolling:
                magnitude = float("inf")
            elif factor in (J, W):
                magnitude *= n
            elif factor in bounds:
                magnitude *= bounds[factor]
            else:
                raise Unproven(f"cannot bound the bias term {term} on hidden keys")
        total += magnitude
    return total
