"""Run-time guards of a rewritten graph: conditions the proof could not settle from the graph.

A guard is checked by the backend before each call of the rewritten graph; when one fails, that
call runs the *fallback* graph (the model's own attention, with the page statistics still
maintained) and the failure is reported once with a warning, so nothing falls back silently.

- :class:`MaskGuard`: the attention mask is a graph input (transformers builds it outside the
  model's forward). The rewrite is right when, at this call, the mask shows exactly the keys
  ``0..position`` of the key axis (0 or True there, ``<= MASK_FLOOR`` or False after). Checking
  it reads the mask once and synchronizes with the device once per step. A site compiled on a
  left-padded example (``prefix``) accepts a hidden prefix per row: the mask must show exactly
  ``row_start[b]..position``, ``row_start`` being the row's count of leading hidden keys (the
  rewritten graph computes the same count in the graph, :func:`row_start_from_mask`, and passes
  it to ``decode_step``), with at least one key shown.
- :class:`StateGuard`: a buffer the proof read (a causal mask buffer, ALiBi slopes) is still the
  same tensor, not modified in place since compile time (data pointer and version counter; no
  device work).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.fx import GraphModule

#: A key whose additive bias is at most this (or -inf) is hidden: entmax gives it weight exactly 0
#: as long as the visible scores lie within ``|MASK_FLOOR| - 1/(alpha-1)`` of each other.
MASK_FLOOR = -1e4


@dataclass(frozen=True)
class MaskGuard:
    """The mask input ``input_index`` is causal at the position computed by ``position``."""

    input_index: int
    key_len: int
    position: GraphModule
    arg_indices: tuple[int, ...]
    description: str
    prefix: bool = False  # each row may hide a prefix of its keys (left padding): decode_step's row_start

    def holds(self, args: Sequence[Any]) -> bool:
        mask = args[self.input_index]
        with torch.no_grad():
            position = self.position(*(args[i] for i in self.arg_indices))
        pos = position.reshape(-1)[-1:].to(device=mask.device, dtype=torch.int64)
        keys = _keys(self.key_len, mask.device)
        visible = keys <= pos
        row = mask[..., : self.key_len]
        if self.prefix:
            start = leading_hidden(mask, self.key_len)[..., None]  # [B, ..., 1], one per row of the mask
            visible = visible & (keys >= start)
            if bool((start > pos).any()):  # a row that shows nothing: not what decode_step computes
                return False
        if row.dtype == torch.bool:
            wrong = row != visible
        else:
            wrong = torch.where(visible, row != 0, ~(row <= MASK_FLOOR))
        return not bool(wrong.any())


def leading_hidden(mask: torch.Tensor, key_len: int) -> torch.Tensor:
    """int64 ``mask.shape[:-1]``: the number of leading hidden keys (False, or ``<= MASK_FLOOR``)
    among the first ``key_len`` of each mask row. Fixed shape, no sync."""
    row = mask[..., :key_len]
    hidden = ~row if row.dtype == torch.bool else row <= MASK_FLOOR
    return hidden.to(torch.int64).cumprod(-1).sum(-1)


def row_start_from_mask(mask: torch.Tensor, key_len: int, batch: int) -> torch.Tensor:
    """``decode_step``'s ``row_start`` (int32 ``[batch]``) from a decode mask ``[B or 1, ..., 1,
    >= key_len]``: each sequence's count of leading hidden keys (its left padding), read from the
    mask's first head and query row (the :class:`MaskGuard` checks that every row agrees)."""
    start = leading_hidden(mask, key_len)
    start = start.reshape(start.shape[0], -1)[:, 0]
    return start.expand(batch).to(torch.int32)


@functools.lru_cache(maxsize=32)
def _keys(key_len: int, device: torch.device) -> torch.Tensor:
    """``arange(key_len)`` on ``device``, made once (the guard runs every step)."""
    return torch.arange(key_len, device=device)


@dataclass(frozen=True)
class StateGuard:
    """Input ``input_index`` is the tensor seen at compile time, unmodified since."""

    input_index: int
    data_ptr: int
    version: int
    description: str

    @classmethod
    def of(cls, input_index: int, tensor: torch.Tensor, description: str) -> "StateGuard":
        return cls(input_index, tensor.data_ptr(), tensor._version, description)

    def holds(self, args: Sequence[Any]) -> bool:
        tensor = args[self.input_index]
        return (isinstance(tensor, torch.Tensor) and tensor.data_ptr() == self.data_ptr
                and tensor._version == self.version)


Guard = MaskGuard | StateGuard
