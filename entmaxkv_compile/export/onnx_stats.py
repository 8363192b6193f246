"""The statistics graph of a standalone ONNX decode step: page statistics from a filled cache.

The decode step keeps its page statistics up to date as it appends tokens, but it has to start
from statistics that describe the cache it is given. Two ways, both without this package:

- an empty cache: every ``past_*`` input all zeros (the statistics of pages without tokens are
  zeros), then feed the prompt one token at a time through the step;
- a cache filled by another prefill (the model's own prefill graph, say): run the statistics
  graph written here on its K caches, ``(seqlens, past_key_values.{i}.key...) ->
  past_page_stats.{i}.{kmin,kmax,kmean,km2}...``, whose outputs are named like the step's
  inputs so they can be fed straight in. ``seqlens`` (int64 ``[B]``) is the number of tokens each
  sequence holds.

It is the reference prefill (:func:`entmaxkv_compile.runtime.stats.reference.stats_prefill_`):
one masked pass over the cache viewed as pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..runtime.stats.reference import stats_prefill_
from .naming import STAT_FIELDS
from .onnx_simplify import simplify
from .progress import ProgressFn, stage

__all__ = ["StatsGraph", "export_stats_onnx"]


class _PageStatsPrefill(torch.nn.Module):
    """``(seqlens, *k_caches) -> (kmin, kmax, kmean, km2) per cache``: the reference prefill."""

    def __init__(self, page_size: int, stats_like: Sequence[Sequence[torch.Tensor]]) -> None:
        super().__init__()
        self.page_size = page_size
        self.specs = [[(tuple(t.shape), t.dtype) for t in stats] for stats in stats_like]

    def forward(self, seqlens: torch.Tensor, *k_caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs: list[torch.Tensor] = []
        for k_cache, specs in zip(k_caches, self.specs):
            stats = [k_cache.new_zeros(shape, dtype=dtype) for shape, dtype in specs]
            stats_prefill_(k_cache, seqlens, self.page_size, *stats)
            outputs.extend(stats)
        return tuple(outputs)


@dataclass(frozen=True)
class StatsGraph:
    """A saved statistics graph: its file and its input and output names."""

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def export_stats_onnx(
    path: str | Path,
    page_size: int,
    k_caches: Sequence[torch.Tensor],
    stats: Sequence[Sequence[torch.Tensor]],
    *,
    opset_version: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
) -> StatsGraph:
    """Write the statistics graph for K caches shaped like ``k_caches`` (layer ``i`` = index ``i``).

    ``stats[i]`` are layer ``i``'s four statistics tensors (their shapes and dtypes are those of
    the outputs).
    """
    if len(k_caches) != len(stats) or not k_caches:
        raise ValueError(f"k_caches and stats must be non-empty with one entry per layer, got {len(k_caches)} "
                         f"and {len(stats)}")
    path = Path(path)
    module = _PageStatsPrefill(page_size, stats).eval()
    seqlens = torch.full((k_caches[0].shape[0],), k_caches[0].shape[2], dtype=torch.int64)
    input_names = ("seqlens", *(f"past_key_values.{i}.key" for i in range(len(k_caches))))
    output_names = tuple(f"past_page_stats.{i}.{field}" for i in range(len(k_caches)) for field in STAT_FIELDS)
    with stage(progress, "exporting the page-statistics graph to ONNX"):
        program = torch.onnx.export(module, (seqlens, *k_caches), dynamo=True, verbose=False, optimize=False,
                                    input_names=list(input_names), output_names=list(output_names),
                                    opset_version=opset_version)
        simplify(program.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        program.save(str(path))
    return StatsGraph(path, input_names, output_names)
