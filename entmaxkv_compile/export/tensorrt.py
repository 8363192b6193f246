"""TensorRT export through torch-tensorrt's dynamo path, with plugins for the ``entmaxkv`` ops.

The rewritten step is brought to its export form (:mod:`.functional_ops`: functional stats
updates, ``decode_step_plugin`` with every tensor first), its state made explicit
(``(*past_state, *inputs) -> (*present_state, *outputs)``, as for ONNX), and compiled with
``torch_tensorrt.dynamo.compile``. Each export-form op becomes a TensorRT quick-deploy plugin
(``tensorrt.plugin``, TensorRT >= 10.7) named ``entmaxkv::<op>``:

- the descriptor (output shapes and dtypes) comes from the pure shape functions of
  :data:`PLUGINS` below, not from tracing the fake implementation (torch-tensorrt's
  ``generate_plugin`` gives every output the first input's dtype, wrong for the int32 page
  indices and the bool certificate, and does not accept optional tensors);
- the implementation is a JIT one: it wraps TensorRT's buffers as torch tensors and calls the
  torch op on TensorRT's stream, which runs our Triton kernels. Engines therefore need Python and
  this package at run time. No ahead-of-time (``trtp.aot_impl``) implementation is provided: an AOT
  plugin launches exactly one kernel, and ``decode_step`` is several (select, decode, certify);
- the converter is torch-tensorrt's ``generate_plugin_converter``.

TensorRT cannot be installed everywhere (its libraries come from NVIDIA's package index), so
everything here imports it lazily and :func:`export_tensorrt` fails with a message saying what to
install. The descriptors and shape functions are plain Python and tested without TensorRT.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from .functional_ops import to_plugin_form

if TYPE_CHECKING:
    from ..compiler.rewrite import RewriteResult

__all__ = [
    "PLUGINS",
    "OutputSpec",
    "PluginSpec",
    "TensorRTExport",
    "TensorRTUnavailableError",
    "export_tensorrt",
    "register_plugins",
]

ProgressFn = Callable[[str], None]

INSTALL_HINT = (
    "TensorRT export needs a CUDA GPU, torch-tensorrt of the same minor version as torch "
    f"(here torch {torch.__version__.split('+')[0]}: pip install 'torch-tensorrt=="
    f"{'.'.join(torch.__version__.split('+')[0].split('.')[:2])}.*'; pairs: torch 2.11 <-> TensorRT "
    "10.15, 2.12 <-> 10.16, 2.13 <-> 11.0, 2.14 <-> 11.1) and TensorRT >= 10.7 with its Python "
    "plugin module; TensorRT's libraries come from NVIDIA's index: "
    "pip install --extra-index-url https://pypi.nvidia.com tensorrt. "
    "Without them, use --format onnx (onnxruntime) or the torch.compile backend."
)


class TensorRTUnavailableError(RuntimeError):
    """torch-tensorrt / TensorRT (or a CUDA GPU) is missing; the message says what to install."""


@dataclass(frozen=True)
class OutputSpec:
    """One plugin output: its shape as ``(input name, dim)`` picks, and its dtype.

    ``dtype`` is a torch dtype name (``"int32"``, ``"bool"``, ``"float32"``) or ``"like:<input>"``
    for the dtype of that input.
    """

    shape: tuple[tuple[str, int], ...]
    dtype: str


@dataclass(frozen=True)
class PluginSpec:
    """A TensorRT plugin for one export-form op: ``entmaxkv::<name>``."""

    name: str
    tensor_inputs: tuple[str, ...]
    attributes: tuple[tuple[str, type], ...]
    outputs: tuple[OutputSpec, ...]

    @property
    def plugin_id(self) -> str:
        return f"entmaxkv::{self.name}"

    def output_shapes(self, shapes: dict[str, Sequence[Any]]) -> list[tuple[Any, ...]]:
        """The output shapes from the inputs' ``shapes`` (ints, or TensorRT shape expressions)."""
        missing = [name for name in self.tensor_inputs if name not in shapes]
        if missing:
            raise ValueError(f"{self.plugin_id}: missing input shapes {missing}")
        return [tuple(shapes[name][dim] for name, dim in out.shape) for out in self.outputs]

    def output_dtypes(self, dtypes: dict[str, Any], resolve: Callable[[str], Any]) -> list[Any]:
        """The output dtypes: an input's dtype from ``dtypes`` or ``resolve(name)`` of a fixed one."""
        return [dtypes[out.dtype[5:]] if out.dtype.startswith("like:") else resolve(out.dtype)
                for out in self.outputs]


def _stats_plugin(name: str, index: str) -> PluginSpec:
    stats = ("kmin", "kmax", "kmean", "km2")
    return PluginSpec(
        name=name,
        tensor_inputs=("k_cache", index, *stats),
        attributes=(("page_size", int),),
        outputs=tuple(OutputSpec(tuple((s, d) for d in range(4)), f"like:{s}") for s in stats),
    )


_DECODE_ATTRIBUTES = (
    ("scale", float), ("alpha", float), ("page_size", int), ("selector", str), ("token_budget", int),
    ("max_quantile", float), ("margin", float), ("tau_estimate", str), ("sink_pages", int),
    ("recent_pages", int), ("certify_max_rounds", int), ("min_context", int), ("softcap", float),
)

#: The plugins of the export-form ops, in the ops' argument order (tensors first).
PLUGINS: tuple[PluginSpec, ...] = (
    PluginSpec(
        name="decode_step_plugin",
        tensor_inputs=("q", "k_cache", "v_cache", "seqlens", "kmin", "kmax", "kmean", "km2", "alibi_slopes"),
        attributes=_DECODE_ATTRIBUTES,
        outputs=(
            OutputSpec((("q", 0), ("q", 1), ("q", 2), ("q", 3)), "like:q"),
            OutputSpec((("q", 0), ("kmin", 1), ("kmin", 2)), "int32"),
            OutputSpec((("q", 0), ("kmin", 1)), "int32"),
            OutputSpec((("q", 0), ("q", 1)), "bool"),
            OutputSpec((("q", 0), ("q", 1)), "float32"),
        ),
    ),
    _stats_plugin("page_stats_append_functional", "positions"),
    _stats_plugin("page_stats_prefill_functional", "seqlens"),
)

_REGISTERED: set[str] = set()


def _import_tensorrt() -> tuple[Any, Any, Any]:
    """``(tensorrt, tensorrt.plugin, torch_tensorrt)`` or :class:`TensorRTUnavailableError`."""
    try:
        import tensorrt
        import tensorrt.plugin as trtp
        import torch_tensorrt
    except ImportError as error:
        raise TensorRTUnavailableError(f"{error}. {INSTALL_HINT}") from error
    return tensorrt, trtp, torch_tensorrt


def _signature(names: Sequence[tuple[str, Any]], returns: Any = inspect.Signature.empty) -> inspect.Signature:
    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a) for n, a in names]
    return inspect.Signature(parameters, return_annotation=returns)


def _descriptor(spec: PluginSpec, trt: Any, trtp: Any) -> Callable[..., Any]:
    """The ``trtp.register`` function of ``spec``: output TensorDescs from the shape functions."""

    def describe(*args: Any) -> tuple:
        descs = dict(zip(spec.tensor_inputs, args))
        shapes = spec.output_shapes({n: d.shape_expr for n, d in descs.items()})
        dtypes = spec.output_dtypes({n: d.dtype for n, d in descs.items()},
                                    lambda name: {"int32": trt.int32, "bool": trt.bool, "float32": trt.float32}[name])
        return tuple(trtp.from_shape_expr(shape, dtype) for shape, dtype in zip(shapes, dtypes))

    returns = tuple[(trtp.TensorDesc,) * len(spec.outputs)]
    describe.__signature__ = _signature(
        [(n, trtp.TensorDesc) for n in spec.tensor_inputs] + list(spec.attributes), returns)
    describe.__name__ = f"describe_{spec.name}"
    return describe


def _jit_impl(spec: PluginSpec, trtp: Any) -> Callable[..., None]:
    """The ``trtp.impl`` function of ``spec``: run the torch op on TensorRT's buffers and stream."""
    op = getattr(torch.ops.entmaxkv, spec.name).default
    count = len(spec.tensor_inputs)

    def run(*args: Any) -> None:
        tensors = [torch.as_tensor(t, device="cuda") for t in args[:count]]
        attributes = args[count:-2]
        outputs, stream = args[-2], args[-1]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            results = op(*tensors, *attributes)
            for destination, value in zip(outputs, results):
                torch.as_tensor(destination, device="cuda").copy_(value)

    run.__signature__ = _signature(
        [(n, trtp.Tensor) for n in spec.tensor_inputs] + list(spec.attributes)
        + [("outputs", tuple[(trtp.Tensor,) * len(spec.outputs)]), ("stream", int)], None)
    run.__name__ = f"run_{spec.name}"
    return run


def register_plugins(trt: Any = None, trtp: Any = None, converters: Any = None) -> tuple[str, ...]:
    """Register every plugin with TensorRT and its converter with torch-tensorrt (once).

    ``trt``, ``trtp`` (``tensorrt.plugin``) and ``converters``
    (``torch_tensorrt.dynamo.conversion.plugins``) default to the installed modules; tests pass
    stand-ins. Returns the plugin ids registered by this call.
    """
    if trt is None or trtp is None or converters is None:
        trt, trtp, torch_tensorrt = _import_tensorrt()
        converters = torch_tensorrt.dynamo.conversion.plugins
    done = []
    for spec in PLUGINS:
        if spec.plugin_id in _REGISTERED:
            continue
        trtp.register(spec.plugin_id)(_descriptor(spec, trt, trtp))
        trtp.impl(spec.plugin_id)(_jit_impl(spec, trtp))
        converters.generate_plugin_converter(spec.plugin_id, supports_dynamic_shapes=True,
                                             use_aot_if_available=True)
        _REGISTERED.add(spec.plugin_id)
        done.append(spec.plugin_id)
    return tuple(done)


@dataclass(frozen=True)
class TensorRTExport:
    """A saved TensorRT program: ``(*state, *inputs) -> (*new_state, *outputs)``.

    ``explicit`` is the functional torch module it was compiled from (the oracle); its
    ``state_values`` are the initial state, on the GPU.
    """

    path: Path
    explicit: Any


def export_tensorrt(
    result: "RewriteResult", path: str | Path, *, progress: Optional[ProgressFn] = None
) -> TensorRTExport:
    """Compile the rewritten step with TensorRT (plugins for our ops) and save it to ``path``.

    The saved program (``torch_tensorrt.save``, exported-program format) takes ``(*state,
    *inputs)`` and returns ``(*new_state, *outputs)`` (see :mod:`.explicit_state`). Raises
    :class:`TensorRTUnavailableError` when torch-tensorrt, TensorRT or a CUDA GPU is missing.
    """
    from ..compiler.rewrite import timed_step
    from .explicit_state import explicit_state_module, tensor_inputs
    from .references import substitute_references

    trt, trtp, torch_tensorrt = _import_tensorrt()
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"no CUDA GPU is visible. {INSTALL_HINT}")
    register_plugins(trt, trtp, torch_tensorrt.dynamo.conversion.plugins)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in result.example_args)
    with timed_step(progress, "tracing the rewritten step for TensorRT"):
        gm = result.program.module().cuda()
        to_plugin_form(gm)
        kept = frozenset(getattr(torch.ops.entmaxkv, spec.name).default for spec in PLUGINS)
        substitute_references(gm, keep=kept)
        functional = torch.export.export(gm, args, strict=False).run_decompositions()
        explicit = explicit_state_module(functional, result.input_names)
        inputs = (*explicit.state_values, *tensor_inputs(args))
        program = torch.export.export(explicit.module, inputs, strict=False)
    with timed_step(progress, "building the TensorRT engine (torch_tensorrt.dynamo.compile)"):
        compiled = torch_tensorrt.dynamo.compile(program, arg_inputs=list(inputs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=list(inputs))
    return TensorRTExport(path, explicit)
