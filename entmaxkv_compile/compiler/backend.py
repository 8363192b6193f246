"""The torch.compile backend ``"entmaxkv"``.

``torch.compile(model, backend="entmaxkv", options={...})`` finds entmax attention in each graph
Dynamo captures, rewrites decode steps into support-aware sparse decoding (see ``passes/``) and
hands the result to Inductor. Registered through the ``torch_dynamo_backends`` entry point, so the
name works without importing this package first; importing this module installs the entmax
capture polyfills (Dynamo looks the backend up before it traces anything).

``options`` keys: every :class:`~entmaxkv_compile.config.EntmaxKVConfig` field, ``"mode"``
(an Inductor mode such as ``"reduce-overhead"``; ``torch.compile`` refuses ``mode=`` together with
``options=``, so this is how to combine them), ``"compiler"`` (``"inductor"``, default, or
``"eager"`` to run the rewritten graph without Inductor, for debugging), ``"context_parallel"``
(None, True or a ``torch.distributed.ProcessGroup``: the caches are this rank's shard of the
sequence, see ``passes/context_parallel.py``), and any Inductor config key (e.g.
``"max_autotune"``, ``"triton.cudagraphs"``), passed through as a config patch.

A graph that records autograd (grad mode on, an input requiring grad) is not given sparse decode
sites (the decode step has no backward): see :func:`keep_attention_for_autograd`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch.fx import GraphModule

from ..config import EntmaxKVConfig
from ..runtime.stats.paged import PagedKVStats
from ..runtime.stats.reference import KVPageStats
from .capture import install_capture
from .passes.analyze import REFUSED, REWRITTEN, Plan, analyze, log_refused
from .passes.context_parallel import (ContextParallel, ContextParallelCall, blocked_call_message, examples_in_range,
                                      restrict_plan)
from .passes.decode_rewrite import CatchUp, RewriteResult, cache_view, int32_table, rewrite
from .passes.positions import written_before
from .passes.fallback import bookkeeping_only
from .passes.static_state import STATS

__all__ = ["BackendSettings", "entmaxkv_backend", "torch_compile_backend"]

log = logging.getLogger(__name__)

_COMPILERS = ("inductor", "eager")
_MASK_ROW_STARTS = ("example", "always")


@dataclass(frozen=True)
class BackendSettings:
    """The parsed ``options``/``mode`` of one ``torch.compile`` call."""

    config: EntmaxKVConfig = EntmaxKVConfig()
    mode: Optional[str] = None
    compiler: str = "inductor"
    inductor: Mapping[str, Any] = field(default_factory=dict)
    mask_row_start: str = "example"  # when a mask input's hidden prefix becomes row_start (see analyze)
    context_parallel: Optional[ContextParallel] = None  # the caches are this rank's shard of the sequence

    @classmethod
    def parse(cls, options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> "BackendSettings":
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict, got {type(options).__name__}")
        options = dict(options or {})
        if mode is not None and options.get("mode") not in (None, mode):
            raise ValueError(f"mode given twice: mode={mode!r} and options['mode']={options['mode']!r}")
        mode = options.pop("mode", None) or mode
        compiler = options.pop("compiler", "inductor")
        if compiler not in _COMPILERS:
            raise ValueError(f"options['compiler'] must be one of {_COMPILERS}, got {compiler!r}")
        mask_row_start = options.pop("mask_row_start", "example")
        if mask_row_start not in _MASK_ROW_STARTS:
            raise ValueError(f"options['mask_row_start'] must be one of {_MASK_ROW_STARTS}, got {mask_row_start!r}")
        context_parallel = ContextParallel.from_option(options.pop("context_parallel", None))
        known = {f.name for f in dataclasses.fields(EntmaxKVConfig)}
        config = EntmaxKVConfig.from_options({k: v for k, v in options.items() if k in known}).check_compiled()
        inductor = {k: v for k, v in options.items() if k not in known}
        if inductor:
            _check_inductor_keys(inductor)
        if mode not in (None, "default"):
            _check_mode(mode)
        settings = cls(config, mode, compiler, inductor, mask_row_start, context_parallel)
        if context_parallel is not None and settings.config_patches().get("triton.cudagraphs"):
            # Measured on two H200s (NCCL, torch 2.11): the compiled shards never finished a step
            # under Inductor's CUDA graphs (no error, a hang); the same model ran exactly without.
            raise ValueError(f"options['context_parallel'] cannot be combined with Inductor's CUDA graphs "
                             f"(mode={mode!r}): that combination hangs on NCCL (cause not found yet); use "
                             "the default mode or compiler='eager'")
        return settings

    def config_patches(self) -> dict[str, Any]:
        patches: dict[str, Any] = {}
        if self.mode not in (None, "default"):
            patches.update(torch._inductor.list_mode_options(self.mode))
        patches.update(self.inductor)
        return patches


def _check_inductor_keys(keys: Mapping[str, Any]) -> None:
    from torch._inductor import config as inductor_config

    valid = set(inductor_config.get_config_copy())
    unknown = sorted(set(keys) - valid)
    if unknown:
        known = sorted(f.name for f in dataclasses.fields(EntmaxKVConfig))
        raise ValueError(
            f"unknown option(s) {unknown}: not an EntmaxKVConfig field ({known}), 'mode', 'compiler', "
            "'mask_row_start', 'context_parallel', or an Inductor config key"
        )


def _check_mode(mode: str) -> None:
    modes = torch._inductor.list_mode_options()
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")


#: Called with ``(plan, original_code, rewritten_code)`` for every graph compiled (explain, tests).
GraphObserver = Callable[[Plan, str, str], None]
_OBSERVERS: list[GraphObserver] = []


def torch_compile_backend() -> str | Callable[..., Any]:
    """What to pass as ``torch.compile(backend=...)``: ``"entmaxkv"`` where the installed package's
    entry point registered that name, else :func:`entmaxkv_backend` itself (a checkout used from
    its root without installing it)."""
    return "entmaxkv" if "entmaxkv" in torch._dynamo.list_backends() else entmaxkv_backend


def entmaxkv_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Optional[Mapping[str, Any]] = None,
    mode: Optional[str] = None,
) -> Callable[..., Any]:
    """Rewrite entmax decode attention in ``gm`` and compile it with Inductor (or run it eagerly)."""
    install_capture()
    settings = BackendSettings.parse(options, mode)
    original_code = gm.code
    gm = copy_graph_module(gm)  # Dynamo reads its own graph again after the backend returns
    cp = settings.context_parallel
    checked = example_inputs if cp is None else examples_in_range(gm, example_inputs)
    plan = analyze(gm, checked, settings.config, allow_guards=True, mask_row_start=settings.mask_row_start)
    if records_autograd(example_inputs):
        keep_attention_for_autograd(plan)
    if cp is not None:
        restrict_plan(plan, settings.config, cp)
        log_refused(plan.sites, log, "under context_parallel the graph raises when called")
    else:
        log_refused(plan.sites, log)
    fallback = None
    if cp is None and any(action.guards for action in plan.actions):  # planned before ``rewrite`` changes ``gm``
        mapping: dict[torch.fx.Node, torch.fx.Node] = {}
        copy = copy_graph_module(gm, mapping)
        fallback = rewrite(copy, bookkeeping_only(plan, mapping), settings.config, track_order=True)
    result = (rewrite(gm, plan, settings.config, track_order=True, context_parallel=cp) if plan.changes_graph
              else RewriteResult(gm))
    for observer in list(_OBSERVERS):
        observer(plan, original_code, gm.code)
    blocked = blocked_call_message(plan) if cp is not None else ""
    if blocked:
        return _Refused(blocked)
    extra = extra_inputs_for(result, example_inputs)
    if any(isinstance(x, torch.Tensor) and x.is_cuda for x in extra):
        prewarm(result, example_inputs, extra)
    compiled = _hand_off(gm, [*example_inputs, *extra], settings)
    return _Runner(compiled, result, fallback, settings) if result.extra_inputs else compiled


#: Why a decode site of a graph that records autograd keeps the model's attention.
AUTOGRAD_REASON = (
    "the graph records autograd (grad mode is on and an input requires grad) and the sparse decode "
    "step has no backward: the model's attention is kept (page statistics are still updated); "
    "decode under torch.no_grad() or torch.inference_mode() to rewrite it"
)


def records_autograd(example_inputs: Sequence[Any]) -> bool:
    """Whether Inductor will build a backward for this graph: AOTAutograd's own test (grad mode
    on at compile time and some input requiring grad). Dynamo guards on grad mode, so the same
    code called under ``torch.no_grad()`` is a separate graph, rewritten as usual."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def keep_attention_for_autograd(plan: Plan) -> None:
    """Refuse, in place, every decode rewrite of ``plan``: the graph may be differentiated, and
    ``decode_step`` (selection, certificate, sparse kernels) has no derivative. A refused decode
    site stays in ``plan.actions`` so its statistics append is kept (``rewrite`` replaces only
    ``rewritten`` sites): later decode steps under ``no_grad`` see statistics in order."""
    for action in plan.actions:
        if action.site.status == REWRITTEN:
            action.site.status, action.site.reason = REFUSED, AUTOGRAD_REASON
            action.guards = []


def prewarm(result: RewriteResult, inputs: Sequence[Any], extra: Sequence[torch.Tensor]) -> None:
    """Run each inserted ``decode_step`` once, eagerly, before Inductor sees the graph.

    Kernels build per-device tables and autotune on their first call; under
    ``mode="reduce-overhead"`` that first call would otherwise be CUDA-graph-trees' warm-up run,
    whose allocations live in the graph pool, and a table cached from there is reported as an
    untracked live tensor. The call reads the caches and statistics and writes nothing.
    """
    with torch.no_grad():
        for call in result.decode_calls:
            if isinstance(call, ContextParallelCall):
                call.prewarm(inputs, extra)
                continue
            k_cache = cache_view(inputs[call.k_index], call.k_part)
            v_cache = cache_view(inputs[call.v_index], call.v_part)
            q = torch.zeros(call.q_shape, dtype=call.q_dtype, device=k_cache.device)
            seqlens = torch.ones(call.q_shape[0], dtype=torch.int64, device=k_cache.device)
            stats = [extra[i] for i in call.stats_extra]
            slopes = None if call.slopes_extra is None else extra[call.slopes_extra]
            table = {} if call.table_index is None else {"block_table": int32_table(inputs[call.table_index])}
            torch.ops.entmaxkv.decode_step(q, k_cache, v_cache, seqlens, *stats, slopes, *call.constants,
                                           softcap=call.softcap, **table)


def copy_graph_module(gm: GraphModule, mapping: Optional[dict[torch.fx.Node, torch.fx.Node]] = None) -> GraphModule:
    """A copy with its own graph (node meta, Dynamo sources and module metadata carried over).

    ``mapping``, when given, is filled with each original node's copy.
    """
    graph = torch.fx.Graph()
    mapping = {} if mapping is None else mapping
    output = graph.graph_copy(gm.graph, mapping)
    graph.output(output)
    for old, new in mapping.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    for name in ("_param_name_to_source",):
        if hasattr(gm, name):
            setattr(copy, name, getattr(gm, name))
    return copy


def _hand_off(gm: GraphModule, example_inputs: list[Any], settings: BackendSettings) -> Callable[..., Any]:
    if settings.compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=settings.config_patches() or None)


def extra_inputs_for(result: RewriteResult, args: Sequence[Any]) -> list[torch.Tensor]:
    """The values of the rewritten graph's extra inputs for the caches in ``args``.

    Statistics come from the registry (allocated on a cache's first use; a cache first seen by a
    decode graph is caught up from the rows already written), constants from the rewrite.
    """
    catch_ups = {(c.cache_index, c.part): c for c in result.catch_ups}
    values = []
    for extra in result.extra_inputs:
        if extra.kind == "constant":
            values.append(extra.tensor)
            continue
        stats, created = STATS.get(args[extra.cache_index], extra.page_size, extra.moment_dtype, part=extra.part,
                                   paged=extra.paged)
        if created and (extra.cache_index, extra.part) in catch_ups:
            _catch_up(catch_ups[extra.cache_index, extra.part], args, stats)
        state = stats.buffers() if extra.kind == "stats" else stats.sequence_state()
        values.append(state[extra.field])
    return values


def _catch_up(catch_up: CatchUp, args: Sequence[Any], stats: KVPageStats | PagedKVStats) -> None:
    """Fill the statistics of a cache first seen in a decode step (its prefill was not compiled);
    a page pool's through the block table the step is called with; a rolling buffer's from its
    ``min(position, slots)`` written slots, its order state at the position before the step's."""
    cache = cache_view(args[catch_up.cache_index], catch_up.part)
    with torch.no_grad():
        position = catch_up.positions(*(args[i] for i in catch_up.arg_indices))
    if catch_up.slots:  # a rolling buffer: min(position, slots) slots written, the order state at the position
        before = written_before(position, cache.shape[0], catch_up.per_row)
        written = before.clamp(max=catch_up.slots)
        if int(written.max()) > 0:
            torch.ops.entmaxkv.page_stats_prefill(cache, written, catch_up.page_size, *stats.buffers())
        torch.ops.entmaxkv.page_stats_mark_prefilled(written, cache.shape[2], stats.last_position, stats.valid)
        stats.last_position.copy_(before - 1)
        return
    if catch_up.table_index is None:
        written = written_before(position, cache.shape[0], catch_up.per_row)
        if catch_up.shard is not None:  # context parallel: the rows of this rank's range
            start, rows = catch_up.shard
            written = (written - start).clamp(0, rows)
        if int(written.max()) > 0:
            torch.ops.entmaxkv.page_stats_prefill(cache, written, catch_up.page_size, *stats.buffers())
        torch.ops.entmaxkv.page_stats_mark_prefilled(written, cache.shape[2], stats.last_position, stats.valid)
        return
    table = int32_table(args[catch_up.table_index])
    written = written_before(position, table.shape[0], catch_up.per_row)
    if int(written.max()) > 0:
        torch.ops.entmaxkv.paged_stats_prefill(cache, table, written, catch_up.page_size, *stats.buffers())
    torch.ops.entmaxkv.page_stats_mark_prefilled(written, stats.capacity, stats.last_position, stats.valid)


class _Runner:
    """Calls the compiled graph with the page statistics of the caches it is given.

    A rewrite with run-time guards (``passes/guards.py``) checks them first; a call where one
    fails runs ``fallback`` (the model's attention, statistics still maintained; compiled on
    first use) and warns once, naming the guard. ``fallback_calls`` counts those calls.
    """

    def __init__(self, compiled: Callable[..., Any], result: RewriteResult,
                 fallback: Optional[RewriteResult] = None, settings: Optional[BackendSettings] = None) -> None:
        self.compiled = compiled
        self.result = result
        self.fallback = fallback
        self.settings = settings or BackendSettings()
        self.fallback_calls = 0
        self._fallback_compiled: Optional[Callable[..., Any]] = None

    def __call__(self, *args: Any) -> Any:
        failed = next((g for g in self.result.guards if not g.holds(args)), None)
        if failed is not None:
            return self._fall_back(failed, args)
        return self.compiled(*args, *extra_inputs_for(self.result, args))  # compile_fx takes positional args

    def _fall_back(self, guard: Any, args: Sequence[Any]) -> Any:
        if self.settings.context_parallel is not None:
            raise RuntimeError(f"entmaxkv: run-time guard failed ({guard.description}) under context_parallel: there "
                               "is no fallback, the model's own attention over this rank's cache shard is not the "
                               "model's (and its mask would index the shard with a global position)")
        if self.fallback_calls == 0:
            warnings.warn(f"entmaxkv: run-time guard failed ({guard.description}); this call and any other "
                          "where a guard fails run the model's own attention", RuntimeWarning, stacklevel=3)
        self.fallback_calls += 1
        extra = extra_inputs_for(self.fallback, args)
        if self._fallback_compiled is None:
            self._fallback_compiled = _hand_off(self.fallback.gm, [*args, *extra], self.settings)
        return self._fallback_compiled(*args, *extra)


class _Refused:
    """A graph that must not run under ``context_parallel`` (``blocked_call_message``): raises
    ``RuntimeError`` with the reasons when called."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, *args: Any) -> Any:
        raise RuntimeError(self.message)


install_capture()
