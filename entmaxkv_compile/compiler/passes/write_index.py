"""The index a decode step writes its cache at, and the scores rewritten in that index.

``proofs.py`` decides the scores as a function of the key index ``J`` and the write index ``W``.
This module finds ``W`` from the graph (the same index for K and V: one position shared by the
batch, or for a per-row write ``buf[arange(B), :, pos]`` row ``b``'s own position ``pos[b]``, a
symbol carried on the batch axis, ``symbolic.ROW``; or a ``scatter_`` index holding one such
position per row) and substitutes it into the scores, refusing
a mask built from anything else. ``leaves`` is the proof's ``_Leaves``: it knows the graph's
integer inputs (``positions``, ``per_row``), the cache's batch and the evaluator (``ev``).
"""

from __future__ import annotations

from typing import Any

import sympy

from .match_attention import AttentionMatch
from .symbolic import ROW, Sym, Unproven, index_symbol, is_boolean, is_opaque

#: The key index and the write index (the position) of the decision procedure.
J = sympy.Symbol("j", integer=True)
W = sympy.Symbol("w", integer=True)


def write_index(leaves: Any, match: AttentionMatch) -> Any:
    """The symbolic index K (and V) are written at this step."""
    leaves.evaluator()
    k = _written_at(leaves, match.k, "K")
    v = _written_at(leaves, match.v, "V")
    if sympy.simplify(k - v) != 0:
        raise Unproven(f"K and V are written at different indices ({k} and {v})")
    if k.free_symbols - set(leaves.positions):
        raise Unproven(f"the write index {k} depends on more than the integer inputs")
    return k


def _written_at(leaves: Any, read: Any, what: str) -> Any:
    """The index ``read``'s cache is written at: one shared position, or row ``b``'s own position
    (a symbol of ``leaves.per_row``) for a per-row write ``buf[rows, :, pos]``."""
    position = leaves.ev.value(read.positions)
    if read.table is not None:  # a paged write (match_paged.py): row b of the slot is row b's table and position
        return _paged_at(position, what)
    if read.scatter:
        return _scattered_at(position, read, what)
    if read.rows is None:
        if ROW in position.axes:
            raise Unproven(f"the {what} write buf[:, :, positions] with one position per row writes every row at "
                           "every one of those positions (expected buf[arange(B), :, positions])")
        return _scalar(position, f"the {what} write index")
    rows = leaves.ev.value(read.rows)
    row = index_symbol(rows.axes[0]) if rows.ndim == 1 else None
    if rows.shape != (leaves.batch,) or row is None or sympy.simplify(rows.expr - row) != 0:
        raise Unproven(f"the row index of the {what} write is not proved to be arange(B) (row b written as row b)")
    if all(t is None for t in position.axes):
        return _scalar(position, f"the {what} write index")
    if position.axes != (ROW,) or is_boolean(position.expr):
        raise Unproven(f"the {what} write index is not one position per row")
    return position.expr


def _paged_at(position: Sym, what: str) -> Any:
    """A paged write's position tensor (``[B, T]`` or ``[T]``, its slot proved row by row in
    ``match_paged.py``): one position shared by the batch, or row ``b``'s own on the batch axis."""
    if position.ndim == 2 and position.axes[0] in (None, ROW) and position.axes[1] is None \
            and not is_boolean(position.expr):
        return position.expr
    return _scalar(position, f"the {what} paged write position")


def _scattered_at(index: Sym, read: Any, what: str) -> Any:
    """``buf.scatter_(2, index, x)`` writes row ``b``, head ``h``, feature ``d`` at ``index[b, h, 0, d]``:
    a whole new row per sequence when ``index`` is ``[B, H, 1, D]`` and constant along heads and
    features, i.e. the position shared by the batch or row ``b``'s own (its batch axis ``ROW``)."""
    batch, heads, _, dim = read.shape()
    if index.shape != (batch, heads, 1, dim):
        raise Unproven(f"the {what} scatter index has shape {index.shape}, not [B, H, 1, D] = "
                       f"{[batch, heads, 1, dim]}: it does not write a whole row of every sequence")
    if any(t is not None for t in index.axes[1:]) or index.axes[0] not in (None, ROW) or is_boolean(index.expr):
        raise Unproven(f"the {what} scatter index is not one position per sequence (it varies across heads "
                       "or features)")
    return index.expr


def _scalar(sym: Sym, what: str) -> Any:
    if any(t is not None for t in sym.axes) or is_boolean(sym.expr):
        raise Unproven(f"{what} is not a single integer position")
    return sym.expr


def in_write_index(scores: Sym, write: Any, leaves: Any, slots: int = 0) -> tuple[Any, Any]:
    """``(expr, rolling)``: the scores as an expression of ``j`` (renamed from the key axis), ``w``
    and data symbols, and the position symbol of a rolling buffer (else None).

    A rolling buffer writes at ``Mod(x, slots)``, ``x`` one position shared by the batch and
    ``slots`` exactly the cache's length on the sequence axis: its mask must then be built from
    ``x`` (the position ``w``, which may exceed the slot count), and ``proofs.py`` decides it for
    every ``w >= 0``. Any other modulus, or a per-row position, is refused."""
    key = scores.axes[-1] if scores.axes else None
    if is_opaque(key):
        raise Unproven("the scores vary along the key axis with an input tensor whose content the proof does "
                       "not know (a padding mask or a learned bias)")
    j = index_symbol(key)
    if j is None:
        raise Unproven("the scores do not depend on the key index")
    if any(index_symbol(t) is not None for t in scores.axes[:-1]):
        raise Unproven("the scores depend on an index other than the key index")
    row_axes = [i for i, t in enumerate(scores.axes) if t == ROW]
    if (row_axes or scores.expr.free_symbols & leaves.per_row) and row_axes != [0]:
        raise Unproven("the scores vary with a per-row position along an axis other than the batch axis")
    expr = scores.expr.subs(j, J)
    if not expr.free_symbols & set(leaves.positions):
        return expr, None
    base = write.free_symbols & set(leaves.positions)
    x = next(iter(base)) if len(base) == 1 else None
    proved = expr
    if x is not None and sympy.diff(write, x) == 1 and not (write - x).free_symbols:
        proved = expr.subs(x, W - (write - x))  # written at x + c: the mask's x is w - c
    elif write.free_symbols:
        proved = expr.subs(write, W)  # the mask is built from the very value the write uses
    left = proved.free_symbols & set(leaves.positions)
    if not left:
        return proved, None
    rolling = _rolling_position(write, leaves, slots)
    if rolling is not None:  # slot x % slots holds position x: the mask's x is the position w
        return expr.subs(rolling, W), rolling
    names = ", ".join(sorted(str(s) for s in left))
    raise Unproven(f"the cache is written at index {write}, but the mask is built from {names}: the write "
                   f"index is not proved to be the position{_why_not_rolling(write, leaves, slots)}")


def _rolling_position(write: Any, leaves: Any, slots: int) -> Any:
    """The position symbol ``x`` of a rolling-buffer write ``Mod(x, slots)``, else None."""
    if not isinstance(write, sympy.Mod) or write.args[1] != slots:
        return None
    x = write.args[0]
    if x not in leaves.positions or x in leaves.per_row:
        return None
    return x


def _why_not_rolling(write: Any, leaves: Any, slots: int) -> str:
    """Why a write ``Mod(...)`` is not the rolling buffer the proof accepts (empty for other writes)."""
    if not write.has(sympy.Mod):
        return ""
    if isinstance(write, sympy.Mod) and write.args[1] != slots:
        return (f" (a rolling buffer?): its modulus {write.args[1]} is not the cache's slot count {slots}, so "
                "the slots the mask shows are not the last positions written")
    return (f" (a rolling buffer?): a rolling buffer must be written at position % {slots} (the cache's slot "
            "count), the position one integer input shared by the batch")
