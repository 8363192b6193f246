"""The backend's ``context_parallel`` option: a decode site proved as on one GPU, rewritten for a
cache whose sequence is sharded over the ranks of a process group.

The model is the single-GPU model with caches ``C`` rows long on every rank (rank ``r`` owns the
global positions ``[r*C, (r+1)*C)``, ``distributed/cache_shard.py``), called with the *global*
position and the same token on every rank. The proof (``proofs.py``) is unchanged: the mask is a
function of the position, the write index is the position. With the option on, a rewritten site
then differs in two places:

- the model's K and V writes (``buf[:, :, pos] = x``, ``index_copy_``, ``index_put_``, or a ragged
  batch's per-row ``buf[arange(B), :, pos] = x[:, :, 0]``, ``index_put_`` and ``scatter_``) are
  removed and replaced, after the later of the two, by one ``entmaxkv::cp_append``: the rank that
  owns ``pos`` stores the row at ``pos - r*C`` and folds it into its page statistics; the others
  write nothing (the model's write would index past the shard);
- the attention becomes ``entmaxkv::cp_decode_step`` over the rank's cache and statistics with
  the global lengths ``pos + 1`` (per sequence in a ragged batch; ``distributed/ops.py``).

The mask and the scores become dead and are removed, so a global position ``>= C`` never indexes
anything local in the compiled graph. What the eager :class:`ContextParallelDecoder` does not
implement is refused with the reason, and so is a prefill graph (prefill is not context parallel:
each rank loads its range of the prompt, ``scatter_prompt``). A graph with a refused entmax site
cannot run its own attention instead (over one rank's shard it is not the model's), so under the
option such a graph raises when called, naming the sites; a failed run-time guard raises too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch.fx import GraphModule, Node

from ...config import EntmaxKVConfig
from ...distributed.context_parallel import ContextParallelDecoder
from ...distributed.ops import cp_append, cp_decode_step
from ...runtime.stats.reference import KVPageStats
from .analyze import BOOKKEEPING, REFUSED, REWRITTEN, Plan, SitePlan
from .positions import batch_positions, row_seqlens, seqlens_after
from .guards import MaskGuard
from .ir import arg, concrete, dtype_of, op_of, shape_of
from .match_attention import match_attention
from .match_entmax import find_weight_sites
from .match_kv_write import row_positions
from .subgraph import needed_placeholders

__all__ = ["ContextParallel", "ContextParallelCall", "blocked_call_message", "examples_in_range", "restrict_plan"]

#: Why a prefill graph's sites are not rewritten (nor book-kept) under the option.
PREFILL_REASON = ("prefill under context_parallel: not context parallel; load each rank's range of the prompt's "
                  "K/V into its cache (entmaxkv_compile.distributed.scatter_prompt) and start with a decode step, "
                  "whose first call fills this rank's page statistics")

_IN_PLACE_WRITES = ("setitem", "index_copy_", "index_put_", "scatter_")


@dataclass(frozen=True)
class ContextParallel:
    """The process group of the option, by name (what the ops resolve), with this rank's place."""

    group_name: str
    rank: int
    world_size: int

    @classmethod
    def from_option(cls, value: Any) -> Optional["ContextParallel"]:
        """``options["context_parallel"]``: None or False (off), True (the default process
        group) or a ``torch.distributed.ProcessGroup`` this process belongs to."""
        if value is None or value is False:
            return None
        if value is not True and not isinstance(value, dist.ProcessGroup):
            raise TypeError("options['context_parallel'] must be None, True (the default process group) or a "
                            f"torch.distributed.ProcessGroup, got {type(value).__name__} {value!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("options['context_parallel'] needs torch.distributed initialised "
                             "(call torch.distributed.init_process_group first)")
        group = dist.group.WORLD if value is True else value
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("options['context_parallel'] is a process group this process is not a member of")
        return cls(group.group_name, rank, dist.get_world_size(group))

    # --- the rewrite (called by decode_rewrite.rewrite for each rewritten site) ---------------

    def insert_append(self, gm: GraphModule, action: SitePlan, stats: list[Node], order: list[Node],
                      config: EntmaxKVConfig) -> None:
        """Replace the site's K and V writes by one ``cp_append`` after the later of them."""
        k, v = action.match.k, action.match.v
        graph = gm.graph
        index = {node: i for i, node in enumerate(graph.nodes)}
        last = max(k.write, v.write, key=index.__getitem__)
        shape = tuple(concrete(s) for s in k.shape())
        rows_shape = (shape[0], shape[1], 1, shape[3])
        with graph.inserting_before(last.next):
            positions = (graph.call_function(row_positions, (k.positions,)) if action.per_row
                         else graph.call_function(batch_positions, (k.positions, action.match.q)))
            k_new = graph.call_function(new_rows, (written_value(k.write), rows_shape, k.rows is not None))
            v_new = graph.call_function(new_rows, (written_value(v.write), rows_shape, v.rows is not None))
            graph.call_function(cp_append._opoverload, (
                k.cache, v.cache, k_new, v_new, positions, self.group_name, config.page_size, *stats, *order[:2]))
        for write, cache in ((k.write, k.cache), (v.write, v.cache)):
            write.replace_all_uses_with(cache)
            graph.erase_node(write)

    def replace_attention(self, gm: GraphModule, action: SitePlan, stats: list[Node], order: list[Node],
                          config: EntmaxKVConfig, inputs: tuple[int, int, tuple[int, ...], tuple[int, ...]]
                          ) -> "ContextParallelCall":
        """Replace the site's ``weights @ v`` by ``cp_decode_step`` with the global lengths; return
        the call's description for the backend's prewarm. ``inputs``: the graph inputs of the K and
        V caches and the extra inputs of the statistics and of their order state."""
        match = action.match
        graph = gm.graph
        trailing = tuple(concrete(s) for s in shape_of(match.out)[1:])
        with graph.inserting_before(match.out):
            seqlens = (graph.call_function(row_seqlens, (match.k.positions,)) if action.per_row
                       else graph.call_function(seqlens_after, (match.k.positions, match.q)))
            step = graph.call_function(cp_decode_step._opoverload, (
                match.q, match.k.cache, match.v.cache, seqlens, *stats, *order[:2], self.group_name,
                float(match.scale), float(action.alpha), config.page_size, config.selector, config.token_budget,
                float(config.max_quantile), float(config.margin), config.tau_estimate, config.sink_pages,
                config.recent_pages, config.min_context, config.report_bound))
            out = graph.call_function(output_layout, (step, trailing, dtype_of(match.out)))
        out.meta.update({k: v for k, v in match.out.meta.items() if k in ("example_value", "val", "nn_module_stack")})
        match.out.replace_all_uses_with(out)
        k_index, v_index, stats_extra, order_extra = inputs
        return ContextParallelCall(tuple(concrete(d) for d in shape_of(match.q)), dtype_of(match.q), k_index, v_index,
                                   stats_extra, order_extra, float(match.scale), config.replace(alpha=float(action.alpha)))

    def shard(self, action: SitePlan) -> tuple[int, int]:
        """``(first global position, rows)`` of this rank's shard of the site's cache."""
        rows = concrete(action.match.k.shape()[2])
        return self.rank * rows, rows


@dataclass(frozen=True)
class ContextParallelCall:
    """One inserted ``cp_decode_step``: where its tensors come from, for :meth:`prewarm`."""

    q_shape: tuple[int, ...]
    q_dtype: torch.dtype
    k_index: int  # graph inputs of the caches
    v_index: int
    stats_extra: tuple[int, ...]  # extra inputs: kmin, kmax, kmean, km2
    order_extra: tuple[int, ...]  # extra inputs: last_position, valid
    scale: float
    config: EntmaxKVConfig

    def prewarm(self, inputs: Sequence[Any], extra: Sequence[torch.Tensor]) -> None:
        """Run the step once on this rank's shard alone, without collectives (the ranks compile
        independently), so the kernels build their tables and tune before CUDA-graph trees'
        warm-up run (the backend's ``prewarm``). Reads the caches and statistics, writes nothing."""
        k_cache, v_cache = inputs[self.k_index], inputs[self.v_index]
        stats = KVPageStats(*(extra[i] for i in self.stats_extra), self.config.page_size,
                            *(extra[i] for i in self.order_extra))
        decoder = ContextParallelDecoder.over_buffers(self.config, q_heads=self.q_shape[1], k_cache=k_cache,
                                                      v_cache=v_cache, stats=stats, scale=self.scale,
                                                      communicate=False)
        q = torch.zeros(self.q_shape, dtype=self.q_dtype, device=k_cache.device)
        with torch.no_grad():
            decoder.run(q, torch.ones(self.q_shape[0], dtype=torch.int64, device=k_cache.device))


def examples_in_range(gm: GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """The example inputs the analysis checks the graph on, with the integer inputs the cache
    writes' positions are computed from taken modulo the shortest such cache's length ``C``.

    The analysis runs the original graph once on the examples to confirm each site numerically
    (``verify.py``); called with a global position ``>= C`` its cache write would index past the
    shard. Modulo ``C`` is the row the owning rank writes (``pos - r*C`` for ``pos`` in its range),
    so the check sees the step as that rank does; the proof itself is for every position."""
    matches = [match_attention(w) for w in find_weight_sites(gm) if w.confirmed]
    matches = [m for m in matches if m.k.positions is not None and m.k.shape() is not None]
    if not matches:
        return list(example_inputs)
    rows = min(concrete(m.k.shape()[2]) for m in matches)
    sources = {node for m in matches for node in needed_placeholders(gm, [], m.k.positions)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [x % rows if node in sources and isinstance(x, torch.Tensor) and not x.is_floating_point()
            and x.dtype != torch.bool else x for node, x in zip(placeholders, example_inputs)]


def restrict_plan(plan: Plan, config: EntmaxKVConfig, cp: ContextParallel) -> None:
    """Refuse, in place, every site of ``plan`` the context parallel rewrite does not take (with
    the reason) and drop it from the actions: prefill sites, and decode sites whose cache, mask
    or scores :class:`ContextParallelDecoder` does not implement."""
    for action in plan.actions:
        if action.site.status == BOOKKEEPING:
            action.site.status, action.site.reason = REFUSED, PREFILL_REASON
        elif action.site.status == REWRITTEN:
            why = unsupported(action, config)
            if why:
                action.site.status, action.site.reason = REFUSED, f"under context_parallel: {why}"
            else:
                start, rows = cp.shard(action)
                action.site.reason = (f"decode step -> cp_append + cp_decode_step (context parallel: rank {cp.rank} "
                                      f"of {cp.world_size} holds global positions [{start}, {start + rows}))")
    for site in plan.sites:
        if site.status == BOOKKEEPING:  # a prefill that allocates its cache in the graph
            site.status, site.reason = REFUSED, PREFILL_REASON
    plan.actions = [a for a in plan.actions if a.site.status == REWRITTEN]


def unsupported(action: SitePlan, config: EntmaxKVConfig) -> str:
    """Why a proved decode site cannot be rewritten context parallel (empty when it can)."""
    match = action.match
    k, v = match.k, match.v
    if k.table is not None:
        return "a paged KV cache (block table) is not supported; use a contiguous cache [B, Hkv, C, D] per rank"
    if action.slopes is not None:
        return "ALiBi is not supported by context parallel decode"
    if action.row_start_mask is not None or action.window is not None:
        return ("a sliding window or a left-padded mask (decode_step's row_start) is not supported by context "
                "parallel decode")
    if match.softcap:
        return "a logit soft-cap is not supported by context parallel decode"
    if action.rolling is not None:
        return "a rolling-buffer cache is not supported by context parallel decode; use a full-length cache"
    if any(isinstance(g, MaskGuard) for g in action.guards):
        return ("the attention mask is a graph input, checked per call against this rank's key axis, which the "
                "global position does not index; build the causal mask from the position in the model")
    if k.part is not None or v.part is not None:
        return "a fused K/V buffer is not supported; keep separate K and V caches"
    for read, name in ((k, "K"), (v, "V")):
        if op_of(read.write) not in _IN_PLACE_WRITES or written_value(read.write) is None:
            return (f"the {name} cache write {op_of(read.write)} is not buf[:, :, pos] = x, buf.index_copy_(2, pos, x), "
                    "buf.index_put_((None, None, pos), x), their per-row forms buf[arange(B), :, pos] = x[:, :, 0] "
                    "and buf.index_put_((arange(B), None, pos), ...), or buf.scatter_(2, index, x)")
    rows = concrete(k.shape()[2])
    if rows % config.page_size:
        return (f"the cache holds {rows} rows, not a whole number of pages of page_size {config.page_size} (each "
                "rank owns whole pages: size it with entmaxkv_compile.distributed.context_parallel_capacity)")
    return ""


def blocked_call_message(plan: Plan) -> str:
    """The error a call of this graph raises under the option, empty when it may run: every entmax
    site must be rewritten (a refused site's own attention over one rank's shard, or a prefill
    writing global positions into the shard, would be silently wrong)."""
    refused = [s for s in plan.sites if s.status == REFUSED]
    if not refused:
        return ""
    lines = "; ".join(f"{s.where} ({s.phase or 'unknown phase'}): {s.reason}" for s in refused)
    return (f"entmaxkv: this graph has entmax attention that is not rewritten under context_parallel, and its "
            f"own attention over one rank's cache shard is not the model's: {lines}")


def written_value(write: Node) -> Optional[Any]:
    """The new rows of a cache write (``setitem``'s value, ``index_copy_``'s source,
    ``index_put_``'s values without accumulation, ``scatter_``'s source), None when the write is
    not one of those."""
    kind = op_of(write)
    if kind == "setitem":
        return write.args[2] if len(write.args) > 2 else None
    if kind == "index_copy_":
        return arg(write, 3)
    if kind == "index_put_":
        accumulate = write.args[3] if len(write.args) > 3 else write.kwargs.get("accumulate", False)
        return None if accumulate else arg(write, 2)
    if kind == "scatter_":  # match_kv_write accepts it without a reduction only
        return write.args[3] if len(write.args) > 3 else write.kwargs.get("src")
    return None


def new_rows(value: torch.Tensor, shape: tuple[int, int, int, int], per_row: bool) -> torch.Tensor:
    """The written value as the ``[B, Hkv, 1, D]`` rows of the step (broadcast as the write did);
    ``per_row``: a write ``buf[rows, :, pos] = x`` whose value is ``[B, Hkv, D]``."""
    return (value.unsqueeze(2) if per_row else value).expand(shape)


def output_layout(out: torch.Tensor, trailing: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``cp_decode_step``'s ``out [B, Hq, 1, D]`` in the replaced node's layout and dtype."""
    if trailing != tuple(out.shape[1:]):
        out = out.reshape((-1,) + trailing)
    return out.to(dtype)

