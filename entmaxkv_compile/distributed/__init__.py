"""Decode beyond one device on torch.distributed: context parallel (the sequence sharded over
ranks, the exact global entmax from a few small collectives) and tensor-parallel helpers (heads
sharded, gpt-fast style); for a compiled model, the backend's ``context_parallel`` option and
``context_parallel_capacity``/``scatter_prompt`` to size and load each rank's cache. See
docs/distributed.md."""

from .cache_shard import context_parallel_capacity, scatter_prompt
from .collectives import Collectives
from .context_parallel import ContextParallelDecoder
from .global_tau import TauSettings, global_threshold
from .launch import spawn

__all__ = ["Collectives", "ContextParallelDecoder", "TauSettings", "context_parallel_capacity", "global_threshold",
           "scatter_prompt", "spawn"]
