"""The ``torch.library`` ops of context parallel decode, for the backend's ``context_parallel``
option (``compiler/passes/context_parallel.py`` inserts them).

- ``entmaxkv::cp_append``: the step's new K/V row, written at its global position on the rank
  that owns it (``pos - r*C``) and folded into that rank's page statistics; the other ranks keep
  their shard (no out-of-range write anywhere);
- ``entmaxkv::cp_decode_step``: :meth:`ContextParallelDecoder.run` over the model's own cache
  buffers and statistics, with the global lengths: the exact global entmax from a few
  collectives on the group.

Both build a :class:`ContextParallelDecoder` over the tensors they are given
(:meth:`~ContextParallelDecoder.over_buffers`: no allocation of caches or statistics, host work
only) and resolve the process group from its name (``ProcessGroup.group_name``), as torch's
functional collectives do, so the graph holds a string, not a Python object. The step itself is
fixed-shape and, on NCCL, capturable in a CUDA graph (see ``context_parallel.py``). Every rank
must run the same ops in the same order: the compiled graphs of one model do.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

from ..config import EntmaxKVConfig
from ..runtime.stats.reference import KVPageStats
from .context_parallel import ContextParallelDecoder

__all__ = ["cp_append", "cp_decode_step"]


@torch.library.custom_op("entmaxkv::cp_append",
                         mutates_args=("k_cache", "v_cache", "kmin", "kmax", "kmean", "km2", "last_position", "valid"))
def cp_append(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor, group_name: str,
              page_size: int, kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor, last_position: Tensor,
              valid: Tensor) -> None:
    """Write ``k_new, v_new [B, Hkv, 1, D]`` at the global ``positions [B]`` on the rank of
    ``group_name`` that owns each position, and fold them into its statistics and their order
    state (:meth:`ContextParallelDecoder.append`; no sync, no collective)."""
    stats = KVPageStats(kmin, kmax, kmean, km2, page_size, last_position, valid)
    decoder = ContextParallelDecoder.over_buffers(_config(page_size), group=_resolve_process_group(group_name),
                                                  q_heads=k_cache.shape[1], k_cache=k_cache, v_cache=v_cache,
                                                  stats=stats)
    decoder.append(k_new, v_new, positions)


@cp_append.register_fake
def _(k_cache, v_cache, k_new, v_new, positions, group_name, page_size, kmin, kmax, kmean, km2, last_position,
      valid) -> None:
    return None


@torch.library.custom_op("entmaxkv::cp_decode_step", mutates_args=())
def cp_decode_step(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, kmin: Tensor, kmax: Tensor,
                   kmean: Tensor, km2: Tensor, last_position: Tensor, valid: Tensor, group_name: str, scale: float,
                   alpha: float, page_size: int, selector: str, token_budget: int, max_quantile: float,
                   margin: float, tau_estimate: str, sink_pages: int, recent_pages: int, min_context: int,
                   report_bound: bool) -> Tensor:
    """``out [B, Hq, 1, D]`` of one context parallel decode step of ``q`` over the first
    ``seqlens [B]`` global tokens (this rank's shard: the caches and statistics given), the
    same on every rank of ``group_name``."""
    config = _config(page_size, selector, token_budget, max_quantile, margin, tau_estimate, sink_pages,
                     recent_pages, min_context, report_bound, alpha)
    stats = KVPageStats(kmin, kmax, kmean, km2, page_size, last_position, valid)
    decoder = ContextParallelDecoder.over_buffers(config, group=_resolve_process_group(group_name),
                                                  q_heads=q.shape[1], k_cache=k_cache, v_cache=v_cache,
                                                  stats=stats, scale=scale)
    return decoder.run(q, seqlens).out


@cp_decode_step.register_fake
def _(q, k_cache, v_cache, seqlens, kmin, kmax, kmean, km2, last_position, valid, *rest) -> Tensor:
    return torch.empty_like(q)


_FIELDS = ("page_size", "selector", "token_budget", "max_quantile", "margin", "tau_estimate", "sink_pages",
           "recent_pages", "min_context", "report_bound", "alpha")


@functools.lru_cache(maxsize=64)
def _config(*fields) -> EntmaxKVConfig:
    """The validated config of a call (cached: the ops run every token)."""
    return EntmaxKVConfig(**dict(zip(_FIELDS, fields)))
