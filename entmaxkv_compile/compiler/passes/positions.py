"""Lengths and starts from the positions a decode step writes at: small functions the decode
rewrite inserts into graphs (``decode_rewrite.py``, ``context_parallel.py``) and the backend calls
when it catches statistics up (``backend.py``). Fixed shapes, no host sync."""

from __future__ import annotations

from typing import Optional

import torch

from .match_kv_write import row_positions

__all__ = ["batch_positions", "rolling_seqlens_after", "row_seqlens", "row_seqlens_after", "seqlens_after",
           "window_start", "written_before"]


def row_seqlens(positions: torch.Tensor) -> torch.Tensor:
    """Valid tokens of each sequence of a ragged step once its own position is in: ``positions + 1``."""
    return row_positions(positions) + 1


def written_before(position: torch.Tensor, batch: int, per_row: bool) -> torch.Tensor:
    """int64 ``[B]``: the rows each sequence holds before a decode step writes at ``position``
    (the step's position per row, or its one shared position for every row)."""
    if per_row:
        return row_positions(position)
    return position.reshape(-1)[-1:].to(torch.int64).expand(batch).contiguous()


def window_start(seqlens: torch.Tensor, window: int, row_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``decode_step``'s ``row_start`` (int32 ``[B]``) of a sliding window of ``window`` keys: row
    ``b`` attends ``[max(0, seqlens[b] - window), seqlens[b])``, the later of that and ``row_start``
    (a left-padded row whose padding reaches past the window's start). Fixed shape, no sync."""
    start = (seqlens.to(torch.int64) - window).clamp_min(0)
    if row_start is not None:
        start = torch.maximum(start, row_start.to(torch.int64))
    return start.to(torch.int32)


def row_seqlens_after(positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A paged prefill's valid tokens per sequence: the last position of each row of a ``[B, T]``
    position tensor plus one, or of a ``[T]`` one shared by every row."""
    rows = positions.reshape(q.shape[0] if positions.dim() == 2 else 1, -1)
    return (rows[:, -1:].to(torch.int64) + 1).reshape(-1).expand(q.shape[0]).contiguous()


def batch_positions(positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The last written position as int64, broadcast to ``[B]`` (B = q's batch)."""
    return positions.reshape(-1)[-1:].to(torch.int64).expand(q.shape[0]).contiguous()


def seqlens_after(positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Valid tokens once the last written position is in: ``last position + 1`` per sequence."""
    return batch_positions(positions, q) + 1


def rolling_seqlens_after(positions: torch.Tensor, q: torch.Tensor, slots: int) -> torch.Tensor:
    """A rolling buffer of ``slots`` slots once the last position is written: ``min(position + 1,
    slots)`` per sequence (every written slot; ``positions`` the positions, not the slots)."""
    return (batch_positions(positions, q) + 1).clamp(max=slots)
