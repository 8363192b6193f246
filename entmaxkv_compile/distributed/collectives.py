"""The few collectives the distributed decode uses, on one process group.

Only ``all_reduce`` (SUM, MAX) and ``all_gather`` of small dense tensors on the local device: both
gloo (CPU) and NCCL (GPU) support them, with results bitwise identical on every rank, so every
rank takes the same data-dependent branch of a tensor computation and they stay in lockstep. A
group of one process needs no communication: the calls return their input (so the same code runs
a single-GPU baseline without ``init_process_group``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["Collectives"]


class Collectives:
    """``all_reduce``/``all_gather`` on ``group`` (None: the default group, or no group at all
    when torch.distributed is not initialised, which means one process), counting the calls and
    the bytes each rank sends, for the benchmark's accounting."""

    def __init__(self, group: Optional[Any] = None) -> None:
        if dist.is_available() and dist.is_initialized():
            self.group = group
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        elif group is not None:
            raise ValueError("group was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        else:
            self.group, self.rank, self.world_size = None, 0, 1
        self.calls = 0
        self.bytes = 0

    @classmethod
    def local(cls) -> "Collectives":
        """A one-process instance that communicates nothing, even inside an initialised group:
        the same step on one rank's data alone (the benchmark times the step's compute with it)."""
        comm = cls.__new__(cls)
        comm.group, comm.rank, comm.world_size, comm.calls, comm.bytes = None, 0, 1, 0, 0
        return comm

    def _count(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place SUM over the ranks; returns ``tensor``."""
        return self._reduce_(tensor, dist.ReduceOp.SUM if self.world_size > 1 else None)

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place MAX over the ranks; returns ``tensor``."""
        return self._reduce_(tensor, dist.ReduceOp.MAX if self.world_size > 1 else None)

    def _reduce_(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        self._count(tensor)
        if op is not None:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[W, *tensor.shape]``: every rank's ``tensor``, in rank order."""
        self._count(tensor)
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        if dist.get_backend(self.group) == "nccl":  # one buffer, no stack (gloo lacks this form)
            out = torch.empty((self.world_size, *tensor.shape), device=tensor.device, dtype=tensor.dtype)
            dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group)
            return out
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)
