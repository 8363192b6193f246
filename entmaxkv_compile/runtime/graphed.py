"""Replay a decoder's step from a CUDA graph, so an eager call costs one graph launch.

A decode step is ~15 kernel launches and their Python wrappers: 0.9-3.5 ms of host time per
eager call on an H200, against 0.1-1.5 ms of device time. :class:`GraphedStep` records the step
once per (K cache, V cache, seqlens dtype) and afterwards copies the step's query and lengths
into the graph's static inputs and replays it. The caches and the page statistics are read in
place (their addresses are part of the key), so rows written into the caches between calls are
seen. Results are copied out of the graph's static outputs, so a caller may keep them across
steps exactly as with an eager call.
"""

from __future__ import annotations

from typing import Callable, Hashable, NamedTuple, Sequence

import torch

__all__ = ["GraphedStep"]

_WARMUP_CALLS = 2


class _Recording(NamedTuple):
    graph: torch.cuda.CUDAGraph
    q: torch.Tensor
    seqlens: torch.Tensor
    result: tuple[torch.Tensor, ...]
    block_table: torch.Tensor | None = None


class GraphedStep:
    """``step(q, k_cache, v_cache, seqlens, variant)`` recorded in a CUDA graph on first use per
    cache and ``variant`` (a hashable the caller picks on the host, e.g. which form of the step).

    ``step`` must be capturable (no host sync, fixed shapes) and must read nothing but its
    arguments and state whose addresses never change (the decoder's statistics and slopes).
    ``state``: tensors the step updates in place (the certified mode's policy counter); the
    warm-up calls before a recording restore them, so recording changes nothing.
    Called while another graph is being captured (``torch.compile``'s CUDA graphs, a user's own
    capture), it runs ``step`` directly: that outer graph records it. A paged cache's
    ``block_table`` is a step input like the lengths: copied into the graph's own table before
    each replay (``step`` then gets it as ``block_table=``).
    """

    def __init__(self, step: Callable[..., tuple[torch.Tensor, ...]], state: Sequence[torch.Tensor] = (),
                 max_recordings: int = 8) -> None:
        self.step = step
        self.state = tuple(state)
        self.max_recordings = max_recordings
        self.recordings: dict[tuple, _Recording] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 seqlens: torch.Tensor, variant: Hashable = None,
                 block_table: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        paged = {} if block_table is None else {"block_table": block_table}
        if torch.cuda.is_current_stream_capturing():
            return self.step(q, k_cache, v_cache, seqlens, variant, **paged)
        key = (k_cache.data_ptr(), k_cache.stride(), v_cache.data_ptr(), v_cache.stride(), seqlens.dtype,
               variant)
        if block_table is not None:
            key += (tuple(block_table.shape), block_table.dtype)
        recording = self.recordings.get(key)
        if recording is None:
            recording = self._record(key, q, k_cache, v_cache, seqlens, variant, block_table)
        recording.q.copy_(q)
        recording.seqlens.copy_(seqlens)
        if block_table is not None:
            recording.block_table.copy_(block_table)
        recording.graph.replay()
        return tuple(t.clone() for t in recording.result)

    def _record(self, key: tuple, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                seqlens: torch.Tensor, variant: Hashable, block_table: torch.Tensor | None = None) -> _Recording:
        if len(self.recordings) >= self.max_recordings:  # caches come and go: keep the newest few
            self.recordings.pop(next(iter(self.recordings)))
        static_q, static_seqlens = q.clone(), seqlens.clone()
        static_table = None if block_table is None else block_table.clone()
        paged = {} if static_table is None else {"block_table": static_table}
        side = torch.cuda.Stream(device=q.device)
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):  # compile and autotune the kernels outside the capture
            saved = [t.clone() for t in self.state]
            for _ in range(_WARMUP_CALLS):
                self.step(static_q, k_cache, v_cache, static_seqlens, variant, **paged)
            for t, value in zip(self.state, saved):
                t.copy_(value)
        torch.cuda.current_stream(q.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            result = tuple(self.step(static_q, k_cache, v_cache, static_seqlens, variant, **paged))
        recording = _Recording(graph, static_q, static_seqlens, result, static_table)
        self.recordings[key] = recording
        return recording
