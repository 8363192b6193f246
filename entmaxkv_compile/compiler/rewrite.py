"""The offline rewrite: a model's decode step in, a rewritten ``torch.export`` program out.

:func:`rewrite` exports the decode step with ``torch.export`` (strict, so the capture polyfills
turn known entmax calls into the marker op; non-strict as a fallback, where hand-written and
inlined entmax is still found structurally), applies the same graph passes as the
``torch.compile`` backend to the exported graph, and exports the rewritten graph again. The
result is a self-contained :class:`torch.export.ExportedProgram` whose state holds the model's
parameters and buffers *plus* the page-statistics buffers the passes added, prefilled from the
cache contents at rewrite time, so

    torch.export.load(path).module()(*example_decode_args)

reproduces the model's own decode step from the same state (and keeps the statistics up to date
as it writes the caches). Load it after ``import entmaxkv_compile``, which registers the ops.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, TensorArgument

from ..config import EntmaxKVConfig
from ..runtime.stats.reference import KVPageStats
from .explain import ExplainReport, GraphRecord
from .passes.analyze import REWRITTEN, log_refused
from .passes.decode_rewrite import STAT_FIELDS as STATS_FIELDS
from .passes.positions import written_before

log = logging.getLogger(__name__)

__all__ = ["RewriteResult", "UnsupportedModelError", "rewrite", "timed_step"]

ProgressFn = Callable[[str], None]


class UnsupportedModelError(ValueError):
    """The model's decode step cannot be rewritten; the message names each site, why, and what to change."""


def print_progress(message: str) -> None:
    """The default progress sink of the command line: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed_step(progress: Optional[ProgressFn], label: str) -> Iterator[None]:
    """Report ``label`` before a long step and its duration after it (nothing if ``progress`` is None)."""
    if progress is None:
        yield
        return
    progress(f"[entmaxkv] {label} ...")
    start = time.perf_counter()
    yield
    progress(f"[entmaxkv] {label}: done in {time.perf_counter() - start:.1f} s")


@dataclass
class RewriteResult:
    """A rewritten decode step.

    Attributes:
        program: the rewritten ``ExportedProgram`` (state: the model's + the page statistics).
        report: the passes' report (an ``ExplainReport``: ``.sites``, prints as the explain table).
        config: the configuration the step was rewritten with.
        example_args: the example decode arguments it was exported with.
        input_names: the model's names of those arguments (e.g. ``("idx", "input_pos")``).
    """

    program: torch.export.ExportedProgram
    report: Any
    config: EntmaxKVConfig
    example_args: tuple
    input_names: tuple[str, ...] = ()

    def module(self) -> torch.nn.Module:
        """The runnable rewritten step (calls mutate its state, like the model's step)."""
        return self.program.module()

    def save(self, path: str | Path) -> Path:
        """Save the program (``torch.export.save``); reload with ``torch.export.load``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(self.program, str(path))
        return path


def _as_args(example_decode_args: Any) -> tuple:
    if isinstance(example_decode_args, torch.Tensor):
        return (example_decode_args,)
    if isinstance(example_decode_args, list):
        return tuple(example_decode_args)
    if not isinstance(example_decode_args, tuple):
        raise TypeError(
            "example_decode_args must be a tuple of the decode step's positional arguments, "
            f"got {type(example_decode_args).__name__}"
        )
    return example_decode_args


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def export_decode_step(
    model: torch.nn.Module, args: tuple, *, progress: Optional[ProgressFn] = None
) -> torch.export.ExportedProgram:
    """``torch.export`` the decode step, strict first (entmax calls become the marker op)."""
    from .capture import install_capture

    install_capture()
    with timed_step(progress, "exporting the decode step (torch.export, strict)"):
        try:
            return torch.export.export(model, args, strict=True)
        except Exception as strict_error:  # noqa: BLE001 - any tracer failure: retry non-strict
            strict_reason = _first_line(strict_error)
    if progress is not None:
        progress(f"[entmaxkv] strict export failed ({strict_reason}); retrying non-strict "
                 "(entmax calls are then matched structurally)")
    with timed_step(progress, "exporting the decode step (torch.export, non-strict)"):
        try:
            return torch.export.export(model, args, strict=False)
        except Exception as error:  # noqa: BLE001
            raise UnsupportedModelError(
                f"torch.export could not trace the decode step: {_first_line(error)} "
                f"(strict mode: {strict_reason}). Make the step traceable: a static KV cache "
                "(fixed-size buffers written at a position tensor), no data-dependent Python "
                "control flow, tensor inputs only."
            ) from error


class RewrittenStep(torch.nn.Module):
    """The rewritten (lifted) decode graph together with the state it reads.

    ``state`` holds the program's parameters, buffers and constants under their original names
    (so the rewritten program's state dict keeps the model's keys) and ``entmaxkv.*`` the tensors
    the passes added (page statistics per K cache, ALiBi slopes). ``forward`` takes the decode
    step's own arguments.
    """

    def __init__(self, graph: torch.fx.GraphModule, state: list[tuple[str, torch.Tensor]],
                 extras: list[tuple[str, torch.Tensor]], in_spec: Any, out_spec: Any) -> None:
        super().__init__()
        self.entmaxkv_graph = graph
        self._state = [(name, isinstance(tensor, torch.nn.Parameter)) for name, tensor in state]
        self._extra_names = [name for name, _ in extras]
        self._in_spec, self._out_spec = in_spec, out_spec
        for name, tensor in [*state, *extras]:
            _set_tensor(self, name, tensor)

    def forward(self, *args: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, {}))
        if spec != self._in_spec:
            raise TypeError(f"the rewritten step takes arguments structured as {self._in_spec}, got {spec}")
        state = [self.get_parameter(n) if is_param else self.get_buffer(n) for n, is_param in self._state]
        extras = [self.get_buffer(n) for n in self._extra_names]
        return pytree.tree_unflatten(list(self.entmaxkv_graph(*state, *flat, *extras)), self._out_spec)


def _set_tensor(root: torch.nn.Module, fqn: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` at dotted path ``fqn`` (parameters stay parameters), creating parents."""
    *path, leaf = fqn.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(tensor, torch.nn.Parameter):
        module.register_parameter(leaf, tensor)
    else:
        module.register_buffer(leaf, tensor)


def _lifted_state(program: torch.export.ExportedProgram) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every non-user input of the lifted graph, in placeholder order."""
    state = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise UnsupportedModelError(f"the exported step has an input of kind {spec.kind.name}, "
                                        "which the rewrite does not support")
        tensor = program.state_dict.get(spec.target)
        if tensor is None:
            tensor = program.constants[spec.target]
        state.append((spec.target, tensor))
    return state


def _prefilled_stats(cache: torch.Tensor, page_size: int, position: torch.Tensor, per_row: bool,
                     slots: int = 0) -> KVPageStats:
    """Statistics of one cache filled from the tokens written before this step's ``position``
    (one per sequence when ``per_row``; at most ``slots`` of them for a rolling buffer of that
    many slots, where ``position`` is the position, not the slot)."""
    stats = KVPageStats.allocate(*cache.shape, page_size=page_size, dtype=cache.dtype, device=cache.device)
    written = written_before(position, cache.shape[0], per_row)
    stats.prefill(cache, written.clamp(max=slots) if slots else written)
    return stats


def _apply_passes(
    program: torch.export.ExportedProgram, args: tuple, config: EntmaxKVConfig
) -> tuple[Optional[RewrittenStep], ExplainReport]:
    """Run the decode-rewrite passes on the program's lifted graph: ``(new step or None, report)``.

    The analysis runs the graph once with the mutated buffers cloned (the caches are written,
    counters advance), so the model's state is not touched; the same run gives the position each
    cache is written at, from which its statistics are prefilled.
    """
    from .passes import analyze
    from .passes import rewrite as rewrite_graph
    from .passes.verify import record

    graph = copy.deepcopy(program.graph_module)
    state = _lifted_state(program)
    flat_args, in_spec = pytree.tree_flatten((args, {}))
    inputs = [*(t for _, t in state), *flat_args]
    plan = analyze(graph, inputs, config, paged=False)  # the statistics prefilled here are contiguous only
    log_refused(plan.sites, log)
    code_before = graph.code
    if not any(site.status == REWRITTEN for site in plan.sites):
        return None, ExplainReport([GraphRecord(list(plan.sites), code_before, code_before)])
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    positions = [a.match.k.positions if a.rolling is None else a.rolling for a in plan.actions]
    written = record(graph, inputs, positions)
    position_of = {placeholders.index(a.match.k.cache): (written[node], a.per_row,
                                                         a.match.k.shape()[2] if a.rolling is not None else 0)
                   for a, node in zip(plan.actions, positions)}
    result = rewrite_graph(graph, plan, config)
    report = ExplainReport([GraphRecord(list(plan.sites), code_before, graph.code)])
    extras, stats = [], {}
    for i, extra in enumerate(result.extra_inputs):
        if extra.kind != "stats":
            extras.append((f"entmaxkv.constant{i}", extra.tensor))
            continue
        if extra.cache_index >= len(state):
            raise UnsupportedModelError(
                f"input {extra.cache_index - len(state)} of the step is a KV cache; the offline rewrite needs "
                "the caches as module buffers (register them with register_buffer)")
        key = (extra.cache_index, extra.part, extra.page_size)
        if key not in stats:
            stats[key] = _prefilled_stats(extra.cache_of(inputs), extra.page_size, *position_of[extra.cache_index])
        cache_name = state[extra.cache_index][0].replace(".", "_") + ("" if extra.part is None else f"_{extra.part}")
        extras.append((f"entmaxkv.{cache_name}.{STATS_FIELDS[extra.field]}", stats[key].buffers()[extra.field]))
    return RewrittenStep(graph, state, extras, in_spec, program.call_spec.out_spec), report


def _tensor_input_names(program: torch.export.ExportedProgram) -> tuple[str, ...]:
    """The names of the step's tensor arguments (``None`` arguments are not inputs of exports)."""
    return tuple(spec.arg.name for spec in program.graph_signature.input_specs
                 if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, TensorArgument))


def rewrite(
    model: torch.nn.Module,
    example_decode_args: Any,
    config: Optional[EntmaxKVConfig] = None,
    *,
    progress: Optional[ProgressFn] = None,
) -> RewriteResult:
    """Rewrite ``model``'s decode step into support-aware sparse decoding, ahead of time.

    ``example_decode_args``: the positional arguments of one decode step (query length 1), with
    the model's caches already holding the context. The model is not modified, but the returned
    program shares its parameter and buffer tensors until saved.

    Raises ``UnsupportedModelError`` when the step cannot be exported or no attention site could
    be rewritten (the message lists every site with the reason and what to change).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = _as_args(example_decode_args)
    if config is None:
        config = EntmaxKVConfig()
    elif not isinstance(config, EntmaxKVConfig):
        raise TypeError(f"config must be an EntmaxKVConfig or None, got {type(config).__name__}")
    config.check_compiled()

    program = export_decode_step(model, args, progress=progress)
    with timed_step(progress, "applying the graph passes"):
        step, report = _apply_passes(program, args, config)
    if step is None:
        raise UnsupportedModelError(
            "no attention site of the decode step was rewritten; what the passes found:\n"
            f"{report}\nWhat to change: attention must use entmax (entmax15/sparsemax/entmax_bisect "
            "or a hand-written entmax), read a static KV cache written this step at a position "
            "tensor, and have query length 1."
        )
    with timed_step(progress, "exporting the rewritten step"):
        rewritten = torch.export.export(step, args, strict=False)
    return RewriteResult(program=rewritten, report=report, config=config, example_args=args,
                         input_names=_tensor_input_names(program))
