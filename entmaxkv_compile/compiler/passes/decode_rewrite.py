"""Rewrite a planned graph: cache write (kept) -> statistics update -> decode_step.

For each K cache read by a planned site, the graph gains four inputs (the page statistics, looked
up at run time by the backend, see ``static_state.py``) and one bookkeeping call placed after the
model's own write: ``page_stats_append`` at the written position for decode graphs (in a ragged
batch each sequence's own position, and ``seqlens = positions + 1`` per sequence),
``page_stats_prefill`` up to the last written position for prefill graphs; for a rolling buffer
(``SitePlan.rolling``) ``page_stats_rebuild`` of the written slot's page and ``seqlens =
min(position + 1, slots)``. Each decode site's
``weights @ v`` is replaced by ``decode_step(...)[0]``; the scores, the weights, the mask and the
GQA expansion of the cache become dead and are removed, so no full-cache copy is left. A fused
K/V buffer (``kv[2, B, H, N, D]``) is one graph input: the statistics and ``decode_step`` get its
parts ``kv[0]``, ``kv[1]`` (views, inserted where they are used). A page pool read through a block
table (``match_paged.py``) is rewritten on the pool itself: its statistics are per physical block
(``[num_blocks, Hkv, D]``), kept by ``paged_stats_append``/``paged_stats_prefill`` through the
table, and ``decode_step`` gets the table (as int32) as its ``block_table``.
"""

from __future__ import annotations

import operator

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.fx import GraphModule, Node

from ...config import EntmaxKVConfig
from ...runtime.certify.policy import dense_rows_for
from ...runtime.stats.reference import resolve_moment_dtype, stats_valid_for
from .analyze import REWRITTEN, Plan, SitePlan
from .guards import row_start_from_mask
from .ir import concrete, dtype_of, is_impure, op_of, shape_of
from .match_kv_write import CacheRead, row_positions
from .positions import (batch_positions, rolling_seqlens_after, row_seqlens, row_seqlens_after, seqlens_after,
                        window_start)
from .subgraph import NotExtractable, extract, needed_placeholders

if TYPE_CHECKING:
    from .context_parallel import ContextParallel

STAT_FIELDS = ("kmin", "kmax", "kmean", "km2")


@dataclass(frozen=True)
class ExtraInput:
    """A tensor the rewritten graph takes after the original inputs."""

    kind: str  # "stats" (one of the four buffers of a cache), "order" (its append-order state) or "constant"
    cache_index: int = -1
    page_size: int = 0
    field: int = 0
    tensor: Optional[torch.Tensor] = None
    moment_dtype: str = "float32"
    part: Optional[int] = None  # a fused K/V buffer: the cache is ``input[part]`` (match_kv_write.CacheRead)
    paged: Optional[tuple[int, int]] = None  # a page pool read through a block table: ``(batch, max_pages)``

    def cache_of(self, args: Any) -> torch.Tensor:
        """This input's ``[B, H, N, D]`` cache among the graph's arguments."""
        return cache_view(args[self.cache_index], self.part)


def cache_view(buffer: torch.Tensor, part: Optional[int]) -> torch.Tensor:
    """The cache tensor: the buffer, or its part ``buffer[part]`` for a fused K/V buffer."""
    return buffer if part is None else buffer[part]


@dataclass(frozen=True)
class CatchUp:
    """How to prefill a cache's statistics first seen in a decode graph (an uncompiled prefill)."""

    cache_index: int
    page_size: int
    positions: GraphModule
    arg_indices: tuple[int, ...]
    part: Optional[int] = None
    per_row: bool = False  # ``positions`` gives one position per sequence (a ragged batch)
    table_index: Optional[int] = None  # a page pool: the graph input holding its block table
    shard: Optional[tuple[int, int]] = None  # context parallel: (this rank's first global position, its rows)
    slots: int = 0  # a rolling buffer of that many slots: ``positions`` gives the position, not the slot


@dataclass(frozen=True)
class DecodeCall:
    """The non-tensor arguments of one inserted ``decode_step`` and where its tensors come from."""

    q_shape: tuple[int, ...]
    q_dtype: torch.dtype
    k_index: int
    v_index: int
    stats_extra: tuple[int, ...]  # indices into ``extra_inputs`` of kmin, kmax, kmean, km2
    slopes_extra: Optional[int]
    constants: tuple[Any, ...]  # scale, alpha, page_size, selector, ... (decode_step's order)
    k_part: Optional[int] = None  # fused K/V buffer: K is ``input[k_index][k_part]``
    v_part: Optional[int] = None
    softcap: float = 0.0  # the site's logit soft-cap (decode_step's last argument; 0: none)
    table_index: Optional[int] = None  # a page pool: the graph input holding its block table


@dataclass
class RewriteResult:
    gm: GraphModule
    extra_inputs: list[ExtraInput] = field(default_factory=list)
    catch_ups: list[CatchUp] = field(default_factory=list)
    decode_calls: list[Any] = field(default_factory=list)  # DecodeCall, or context_parallel.ContextParallelCall
    guards: list[Any] = field(default_factory=list)  # run-time conditions of the rewritten sites


def int32_table(table: torch.Tensor) -> torch.Tensor:
    """The block table as ``decode_step`` and the paged statistics take it (int32; no copy when it is)."""
    return table.to(torch.int32)


def decode_output(result: tuple[torch.Tensor, ...], trailing: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """decode_step's ``out [B, Hq, 1, D]`` in the replaced node's layout and dtype."""
    out = result[0]
    if trailing != tuple(out.shape[1:]):
        out = out.reshape((-1,) + trailing)
    return out.to(dtype)


def rewrite(gm: GraphModule, plan: Plan, config: EntmaxKVConfig, *, track_order: bool = False,
            context_parallel: Optional[ContextParallel] = None) -> RewriteResult:
    """Apply ``plan`` to ``gm`` in place and return what the runner must feed the new inputs.

    ``track_order`` (the backend's graphs) also threads each cache's append-order state
    (``KVPageStats.last_position``/``valid``) through the graph: every append records itself, a
    prefill resets it, and ``decode_step`` gets ``stats_valid``, so a position fed out of order
    is never certified and, in certified mode, reads every page. In certified mode it also
    threads the read-everything counter (``certify_skip``, ``runtime/certify/policy.py``):
    ``decode_step`` gets ``dense_rows`` and ``certify_policy_update`` advances the counter.
    ``context_parallel`` (the backend's option; the plan holds decode sites only): the writes and
    the attention become the context parallel ops instead (``context_parallel.py``).
    """
    cp = context_parallel
    result = RewriteResult(gm)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index_of = {node: i for i, node in enumerate(placeholders)}
    fake_mode = _fake_mode(placeholders)
    stats_nodes: dict[Any, list[Node]] = {}
    order_nodes: dict[Any, list[Node]] = {}
    for action in plan.actions:
        read = action.match.k
        if read.key in stats_nodes:
            continue
        stats_nodes[read.key] = _add_stats_inputs(gm, result, read, index_of[read.cache], config, fake_mode)
        order_nodes[read.key] = (_add_order_inputs(gm, result, read, index_of[read.cache], config, fake_mode)
                                 if track_order else [])
        if cp is None:
            _insert_bookkeeping(gm, plan, action, stats_nodes[read.key], order_nodes[read.key], config)
        else:
            cp.insert_append(gm, action, stats_nodes[read.key], order_nodes[read.key], config)
        if action.site.phase == "decode":
            _add_catch_up(gm, result, action, index_of, config.page_size, None if cp is None else cp.shard(action))
    for action in plan.actions:
        if action.site.status == REWRITTEN:
            slopes, slopes_extra = None, None
            if action.slopes is not None:
                slopes_extra = len(result.extra_inputs)
                slopes = _add_input(gm, result, ExtraInput("constant", tensor=action.slopes.to(_device(action))),
                                    f"entmaxkv_alibi_{slopes_extra}", fake_mode)
            result.guards.extend(g for g in action.guards if g not in result.guards)
            k, v = action.match.k, action.match.v
            stats_extra = _extra_indices(result, "stats", index_of[k.cache], k.part)
            if cp is not None:
                result.decode_calls.append(cp.replace_attention(
                    gm, action, stats_nodes[k.key], order_nodes[k.key], config,
                    (index_of[k.cache], index_of[v.cache], stats_extra,
                     _extra_indices(result, "order", index_of[k.cache], k.part)[:2])))
                continue
            constants = _replace_attention(gm, action, stats_nodes[k.key], order_nodes[k.key], slopes, config)
            result.decode_calls.append(DecodeCall(
                tuple(concrete(d) for d in shape_of(action.match.q)), dtype_of(action.match.q),
                index_of[k.cache], index_of[v.cache], stats_extra, slopes_extra, constants, k.part, v.part,
                float(action.match.softcap), index_of[k.table] if k.table is not None else None))
    _erase_dead(gm)
    graph.lint()
    gm.recompile()
    return result


def _extra_indices(result: RewriteResult, kind: str, cache_index: int, part: Optional[int]) -> tuple[int, ...]:
    """Indices into ``result.extra_inputs`` of one cache's inputs of ``kind`` ("stats", "order"), in order."""
    return tuple(i for i, e in enumerate(result.extra_inputs)
                 if e.kind == kind and (e.cache_index, e.part) == (cache_index, part))


def _device(action: SitePlan) -> torch.device:
    value = action.match.q.meta.get("example_value", action.match.q.meta.get("val"))
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _fake_mode(placeholders: list[Node]) -> Any:
    for node in placeholders:
        value = node.meta.get("example_value", node.meta.get("val"))
        mode = getattr(value, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _add_input(gm: GraphModule, result: RewriteResult, extra: ExtraInput, name: str, fake_mode: Any,
               like: Optional[torch.Tensor] = None) -> Node:
    """A new static graph input after the existing ones."""
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    template = extra.tensor if extra.tensor is not None else like
    if fake_mode is not None and template is not None:
        with fake_mode:
            node.meta["example_value"] = torch.empty_strided(
                template.shape, template.stride(), dtype=template.dtype, device=template.device)
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    node._dynamo_source = None  # read by AOTAutograd for graphs that came from Dynamo
    result.extra_inputs.append(extra)
    return node


def _name(read: CacheRead) -> str:
    return read.cache.name if read.part is None else f"{read.cache.name}_{read.part}"


def _add_stats_inputs(gm, result, read: CacheRead, cache_index: int, config: EntmaxKVConfig,
                      fake_mode) -> list[Node]:
    value = read.cache.meta.get("example_value", read.cache.meta.get("val"))
    page_size = config.page_size
    nodes = []
    for i, name in enumerate(STAT_FIELDS):
        like = None
        if isinstance(value, torch.Tensor):
            batch, heads, length, dim = (concrete(s) for s in read.shape())
            shape = (batch, heads, -(-length // page_size), dim)
            if read.table is not None:  # per physical block of the pool
                shape = (concrete(value.shape[0]), heads, dim)
            dtype = value.dtype if i < 2 else resolve_moment_dtype(config.moment_dtype, value.dtype)
            like = _MetaLike(torch.empty(shape, dtype=dtype, device="meta"), value.device)
        extra = ExtraInput("stats", cache_index, page_size, i, moment_dtype=config.moment_dtype, part=read.part,
                           paged=_paged_shape(read))
        nodes.append(_add_input(gm, result, extra, f"entmaxkv_{_name(read)}_{name}", fake_mode, like))
    return nodes


#: ``KVPageStats.sequence_state()``: names and dtypes, in order.
ORDER_FIELDS = (("last_position", torch.int64), ("valid", torch.bool), ("certify_skip", torch.int32))


def _add_order_inputs(gm, result, read: CacheRead, cache_index: int, config: EntmaxKVConfig,
                      fake_mode) -> list[Node]:
    """The cache's per-sequence decode state as graph inputs (``KVPageStats``' fields of
    :data:`ORDER_FIELDS`): last appended position (int64 ``[B]``), valid (bool), and the certified
    mode's read-everything counter (int32)."""
    value = read.cache.meta.get("example_value", read.cache.meta.get("val"))
    nodes = []
    for index, (name, dtype) in enumerate(ORDER_FIELDS):
        like = None
        if isinstance(value, torch.Tensor):
            like = _MetaLike(torch.empty((concrete(read.shape()[0]),), dtype=dtype, device="meta"), value.device)
        extra = ExtraInput("order", cache_index, config.page_size, index, moment_dtype=config.moment_dtype,
                           part=read.part, paged=_paged_shape(read))
        nodes.append(_add_input(gm, result, extra, f"entmaxkv_{_name(read)}_{name}", fake_mode, like))
    return nodes


def _paged_shape(read: CacheRead) -> Optional[tuple[int, int]]:
    """``(batch, max_pages)`` of a page pool's block table, None for a contiguous cache."""
    if read.table is None:
        return None
    batch, max_pages = shape_of(read.table)
    return concrete(batch), concrete(max_pages)


def _table_node(graph: torch.fx.Graph, read: CacheRead) -> Node:
    """The block table as an int32 graph value."""
    return graph.call_function(int32_table, (read.table,))


class _MetaLike:
    """Shape/stride/dtype of a tensor to fake, on the cache's device."""

    def __init__(self, meta: torch.Tensor, device: torch.device) -> None:
        self.shape, self.dtype, self.device = meta.shape, meta.dtype, device
        self._stride = meta.stride()

    def stride(self) -> tuple[int, ...]:
        return self._stride


def _insert_bookkeeping(gm: GraphModule, plan: Plan, action: SitePlan, stats: list[Node], order: list[Node],
                        config: EntmaxKVConfig) -> None:
    """One statistics update per cache, before the first attention that reads it (and, with
    ``order``, the update of its append-order state)."""
    read = action.match.k
    first_out = next(a.match.out for a in plan.actions if a.match.k.key == read.key)
    capacity = concrete(read.shape()[2]) if order else 0
    graph = gm.graph
    with graph.inserting_before(first_out):
        cache = _cache_node(graph, read)
        table = (_table_node(graph, read),) if read.table is not None else ()
        if action.site.phase == "decode" and action.rolling is not None:
            _insert_rolling_bookkeeping(graph, action, cache, stats, order, config)
        elif action.site.phase == "decode":
            positions = (graph.call_function(row_positions, (action.match.k.positions,)) if action.per_row
                         else graph.call_function(batch_positions, (action.match.k.positions, action.match.q)))
            append = torch.ops.entmaxkv.paged_stats_append if table else torch.ops.entmaxkv.page_stats_append
            graph.call_function(append.default, (cache, *table, positions, config.page_size, *stats))
            if order:
                graph.call_function(torch.ops.entmaxkv.page_stats_track.default,
                                    (positions, config.page_size, capacity, *order[:2]))
        else:
            seqlens = graph.call_function(row_seqlens_after if table else seqlens_after,
                                          (action.match.k.positions, action.match.q))
            prefill = torch.ops.entmaxkv.paged_stats_prefill if table else torch.ops.entmaxkv.page_stats_prefill
            graph.call_function(prefill.default, (cache, *table, seqlens, config.page_size, *stats))
            if order:
                graph.call_function(torch.ops.entmaxkv.page_stats_mark_prefilled.default,
                                    (seqlens, capacity, *order[:2]))


def _insert_rolling_bookkeeping(graph: torch.fx.Graph, action: SitePlan, cache: Node, stats: list[Node],
                                order: list[Node], config: EntmaxKVConfig) -> None:
    """A rolling buffer's update (``runtime/stats/rolling.py``): rebuild the page of the slot just
    written from the cache, and record the position (not the slot) in the order state."""
    match = action.match
    slots = graph.call_function(batch_positions, (match.k.positions, match.q))
    seqlens = graph.call_function(rolling_seqlens_after, (action.rolling, match.q, concrete(match.k.shape()[2])))
    graph.call_function(torch.ops.entmaxkv.page_stats_rebuild.default,
                        (cache, slots, seqlens, config.page_size, *stats))
    if order:
        positions = graph.call_function(batch_positions, (action.rolling, match.q))
        graph.call_function(torch.ops.entmaxkv.page_stats_track_rolling.default, (positions, *order[:2]))


def _replace_attention(gm: GraphModule, action: SitePlan, stats: list[Node], order: list[Node],
                       slopes: Optional[Node], config: EntmaxKVConfig) -> tuple[Any, ...]:
    """Insert ``decode_step`` for ``action``; return its constant arguments."""
    match = action.match
    graph = gm.graph
    shape = shape_of(match.out)
    trailing = tuple(concrete(s) for s in shape[1:])
    constants = (
        float(match.scale), float(action.alpha), config.page_size, config.selector, config.token_budget,
        float(config.max_quantile), float(config.margin), config.tau_estimate, config.sink_pages,
        config.recent_pages, config.certify_max_rounds, config.min_context,
    )
    policy = bool(order) and config.selector == "certified"
    with graph.inserting_before(match.out):
        k_cache, v_cache = _cache_node(graph, match.k), _cache_node(graph, match.v)
        if action.rolling is not None:
            seqlens = graph.call_function(rolling_seqlens_after, (action.rolling, match.q,
                                                                  concrete(match.k.shape()[2])))
        elif action.per_row:
            seqlens = graph.call_function(row_seqlens, (match.k.positions,))
        else:
            seqlens = graph.call_function(seqlens_after, (match.k.positions, match.q))
        state = (graph.call_function(stats_valid_for, (*order[:2], seqlens)),) if order else ()
        if policy:
            dense = graph.call_function(dense_rows_for, (order[2],))
            state += (dense,)
        # the cap is decode_step's last argument: by name, and only on a capped site (so an
        # uncapped graph is the same as before it existed)
        capped = {"softcap": float(match.softcap)} if match.softcap else {}
        # row_start likewise: only at a site compiled on a left-padded mask (read from that mask)
        # or with a proved sliding window (the window's start, from the step's lengths), or both
        row_start = None
        if action.row_start_mask is not None:
            row_start = graph.call_function(row_start_from_mask, (
                action.row_start_mask, concrete(match.k.shape()[2]), concrete(shape_of(match.q)[0])))
        if action.window is not None:
            row_start = graph.call_function(window_start, (seqlens, action.window, row_start))
        if row_start is not None:
            capped["row_start"] = row_start
        if match.k.table is not None:  # a page pool: decode_step reads it through the table
            capped["block_table"] = _table_node(graph, match.k)
        step = graph.call_function(torch.ops.entmaxkv.decode_step.default, (
            match.q, k_cache, v_cache, seqlens, *stats, slopes, *constants, *state), capped)
        if policy:
            num_pages = -(-concrete(match.k.shape()[2]) // config.page_size)
            num_selected = graph.call_function(operator.getitem, (step, 2))
            graph.call_function(torch.ops.entmaxkv.certify_policy_update.default, (
                order[2], dense, num_selected, seqlens, config.page_size, num_pages,
                float(config.certify_dense_above), config.certify_probe_every))
        out = graph.call_function(decode_output, (step, trailing, dtype_of(match.out)))
    out.meta.update({k: v for k, v in match.out.meta.items() if k in ("example_value", "val", "nn_module_stack")})
    match.out.replace_all_uses_with(out)
    return constants


def _add_catch_up(gm: GraphModule, result: RewriteResult, action: SitePlan, index_of: dict[Node, int],
                  page_size: int, shard: Optional[tuple[int, int]] = None) -> None:
    positions = action.match.k.positions if action.rolling is None else action.rolling
    try:
        fn = extract(gm, [], positions, allow_placeholders=True)
    except NotExtractable:
        return  # the step's position cannot be computed ahead; a compiled prefill must fill the stats
    args = tuple(index_of[n] for n in needed_placeholders(gm, [], positions))
    table = action.match.k.table
    slots = concrete(action.match.k.shape()[2]) if action.rolling is not None else 0
    result.catch_ups.append(CatchUp(index_of[action.match.k.cache], page_size, fn, args, action.match.k.part,
                                    action.per_row, index_of[table] if table is not None else None, shard, slots))


def _cache_node(graph: torch.fx.Graph, read: CacheRead) -> Node:
    """The ``[B, H, N, D]`` cache as a graph value: the buffer, or ``buffer[part]`` (a view) when fused."""
    return read.cache if read.part is None else graph.call_function(operator.getitem, (read.cache, read.part))


def _erase_dead(gm: GraphModule) -> None:
    """Remove unused nodes of known pure ops (never unknown calls such as grad-mode switches)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if op_of(node) and not node.users and not is_impure(node):
                gm.graph.erase_node(node)
                changed = True
