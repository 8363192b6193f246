"""AOTInductor export: the rewritten decode step as a compiled package that runs without Python.

:func:`export_aoti` replaces every ``entmaxkv`` op of the rewritten step by what it computes
(:mod:`.references`): on CUDA by its composition of our Triton kernels (``triton_op``s, which
Inductor lowers to the kernels themselves, so the package launches the same kernels as the
``torch.compile`` backend), on CPU by its pure-torch reference (as the standard-op ONNX export
does, compiled by Inductor to C++). It then exports the step with ``torch.export`` and packages it
with ``torch._inductor.aoti_compile_and_package``. The package needs neither this package nor
Python: ``torch._inductor.aoti_load_package`` loads it in Python, and
``torch::inductor::AOTIModelPackageLoader`` in C++ (``examples/aoti_runner``).

**State stays inside.** As in the ``.pt2`` program of ``rewrite``, the step's state (the model's
KV caches, the page statistics ``entmaxkv.<cache>.{kmin,kmax,kmean,km2}``, counters) is held by
the package as mutable constants, initialised to their values at export time and updated in
place by every call; the call takes the step's own arguments (e.g. ``idx, input_pos``) and
returns its outputs. So successive calls continue the sequence, each call reads only what the
sparse step reads, and nothing is copied per step. To decode from another cache (filled by a
prefill elsewhere), load it and its page statistics into the package:
:meth:`AotiExport.state_for` computes them, ``step.load_constants(state,
check_full_update=False)`` loads them in Python, ``AOTIModelPackageLoader::load_constants`` in
C++ (the runner does it when its inputs file has a ``state``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from ..runtime.stats.reference import KVPageStats
from .naming import STAT_FIELDS, mutated_buffers
from .progress import ProgressFn, stage
from .references import substitute_kernels, substitute_references

if TYPE_CHECKING:
    from ..compiler.rewrite import RewriteResult

__all__ = ["AotiExport", "export_aoti", "load_aoti", "save_runner_inputs"]


@dataclass(frozen=True)
class AotiExport:
    """A saved AOTInductor package of a rewritten decode step.

    Attributes:
        path: the ``.pt2`` package.
        device: the device it was compiled for (``cpu`` or ``cuda``).
        input_names: the step's tensor arguments, in call order.
        state: names of the mutable constants (caches, page statistics, counters) the step
            updates in place, as ``loader.get_constant_fqns()`` lists them.
        page_size: the page size of the statistics.
    """

    path: Path
    device: torch.device
    input_names: tuple[str, ...]
    state: tuple[str, ...]
    page_size: int

    def state_for(self, caches: Mapping[str, torch.Tensor], seqlens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The constants that make the package decode from ``caches`` (buffer name -> filled cache).

        Returns the caches and the page statistics of each K cache among them, computed from its
        first ``seqlens[b]`` rows (int64 ``[B]``), keyed by constant name: load them with
        ``step.load_constants(state, check_full_update=False)``. Raises ``ValueError`` for a
        name that is not state of the package.
        """
        unknown = sorted(set(caches) - set(self.state))
        if unknown:
            raise ValueError(f"caches must be named by the package's state {list(self.state)}, got {unknown}")
        state: dict[str, torch.Tensor] = {}
        for name, cache in caches.items():
            state[name] = cache.detach().contiguous()
            prefix = f"entmaxkv.{name.replace('.', '_')}."
            if f"{prefix}kmin" in self.state:
                stats = KVPageStats.from_cache(cache.detach(), seqlens.to(cache.device), self.page_size)
                state.update({f"{prefix}{field}": t for field, t in zip(STAT_FIELDS, stats.buffers())})
        return state

    def load(self) -> Any:
        """The compiled step (``torch._inductor.aoti_load_package``); calls continue the sequence."""
        return load_aoti(self.path)


def load_aoti(path: str | Path) -> Any:
    """Load a package written by :func:`export_aoti` (needs torch only, not this package)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not an AOTInductor package file")
    return torch._inductor.aoti_load_package(str(path))


def _resolve_device(device: Optional[str | torch.device]) -> torch.device:
    resolved = torch.device("cpu" if device is None else device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {str(resolved)!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible")
    if resolved.type == "cuda" and resolved.index is None:  # traced tensors name their index
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _configs_for(target: torch.device, configs: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Inductor settings of the compile: on CUDA our kernels' float scalars stay float32, as Triton
    types them when they run eagerly (Inductor would type Python floats float64, which changes the
    kernels' arithmetic and breaks their fp32 loop-carried values)."""
    configs = dict(configs or {})
    if target.type == "cuda" and hasattr(torch._inductor.config, "_use_fp64_for_unbacked_floats"):
        configs.setdefault("_use_fp64_for_unbacked_floats", False)
    return configs


def _retarget(module: torch.nn.Module, target: torch.device) -> None:
    """Point the device arguments burnt into ``module``'s graphs (the program was traced on the
    model's device: factory calls, ``to``, tensor-metadata asserts) at ``target``."""
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if "device" in node.kwargs:
                node.kwargs = {**node.kwargs, "device": target}
            if node.op == "call_function" and node.target is torch.ops.aten.to.device:
                node.args = (node.args[0], target, *node.args[2:])
        graph_module.recompile()


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def export_aoti(
    result: "RewriteResult",
    path: str | Path,
    *,
    device: Optional[str | torch.device] = None,
    inductor_configs: Optional[dict[str, Any]] = None,
    progress: Optional[ProgressFn] = None,
) -> AotiExport:
    """Compile the rewritten step of ``result`` with AOTInductor and package it at ``path``.

    ``device``: ``cpu`` (default) or ``cuda`` (the state and the example arguments are moved
    there). ``inductor_configs`` go to ``aoti_compile_and_package``. The program's state is not
    modified (the package holds a copy). Raises ``ValueError`` on a bad device and
    ``RuntimeError`` if an ``entmaxkv`` op has nothing to replace it.
    """
    target = _resolve_device(device)
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"path must end in .pt2 (an AOTInductor package), got {str(path)!r}")
    args = tuple(_to(a, target) for a in result.example_args)
    ops = "our Triton kernels" if target.type == "cuda" else "reference ops"
    with stage(progress, f"tracing the rewritten step with {ops} (torch.export)"):
        module = copy.deepcopy(result.program.module())  # the package holds a copy of the state
        _retarget(module, target)
        (substitute_kernels if target.type == "cuda" else substitute_references)(module)
        module = module.to(target)
        left = sorted({str(n.target) for n in module.graph.nodes
                       if n.op == "call_function" and str(n.target).startswith("entmaxkv.")})
        if left:
            raise RuntimeError(f"entmaxkv ops without an implementation to trace: {left}")
        program = torch.export.export(module, args, strict=False)
    state = mutated_buffers(program)  # the training IR keeps the in-place ops
    path.parent.mkdir(parents=True, exist_ok=True)
    with stage(progress, f"compiling and packaging with AOTInductor for {target.type} (C++ build, minutes)"):
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                  inductor_configs=_configs_for(target, inductor_configs))
    return AotiExport(path=path, device=target, input_names=tuple(result.input_names), state=state,
                      page_size=result.config.page_size)


def save_runner_inputs(
    path: str | Path,
    tokens: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    expected: Optional[Sequence[torch.Tensor]] = None,
    state: Optional[Mapping[str, torch.Tensor]] = None,
) -> Path:
    """Write the decode inputs of the C++ runner (``examples/aoti_runner``): ``torch.save`` of a dict.

    ``tokens[i]`` and ``positions[i]`` are the arguments of step ``i``; ``expected[i]`` (optional)
    its output, which the runner compares with what it computes; ``state`` (optional, from
    :meth:`AotiExport.state_for`) the constants it loads into the package before the first step.
    The runner reads the file with ``torch::pickle_load``.
    """
    if len(tokens) != len(positions) or not tokens:
        raise ValueError(f"tokens and positions must be non-empty and of one length, got {len(tokens)} "
                         f"and {len(positions)}")
    if expected is not None and len(expected) != len(tokens):
        raise ValueError(f"expected must have one output per step ({len(tokens)}), got {len(expected)}")
    data: dict[str, Any] = {
        "tokens": [t.detach().cpu().contiguous() for t in tokens],
        "positions": [p.detach().cpu().contiguous() for p in positions],
    }
    if expected is not None:
        data["expected"] = [e.detach().cpu().contiguous() for e in expected]
    if state is not None:
        data["state"] = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, str(path))
    return path
