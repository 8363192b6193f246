"""Decode beyond one device on torch.distributed: context parallel (the sequence sharded over
ranks, the exact global entmax from a few small collectives) and tensor-parallel helpers (heads
sharded, gpt-fast style). See docs/distributed.md."""

from .collectives import Collectives
from .context_parallel import ContextParallelDecoder
from .global_tau import TauSettings, global_threshold
from .launch import spawn

__all__ = ["Collectives", "ContextParallelDecoder", "TauSettings", "global_threshold", "spawn"]
