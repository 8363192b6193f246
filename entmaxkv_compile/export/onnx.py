"""ONNX export of a rewritten decode step, with explicit cache inputs and outputs.

Two flavours of the same graph:

- ``decompose=True`` (the default, for onnxruntime and any runtime without our kernels): every
  ``entmaxkv`` op is replaced by its pure-torch reference before tracing, so the model holds only
  standard ONNX ops. onnxruntime runs it on CPU and matches PyTorch.
- ``decompose=False`` (for TensorRT with the ``entmaxkv`` plugins): the export forms of
  ``decode_step`` and of the page-statistics updates (:mod:`.functional_ops`) stay as nodes of
  the custom domain ``entmaxkv``, named and attributed as TensorRT's plugin lookup expects (see
  :mod:`.onnx_schemas`). Every other ``entmaxkv`` op (e.g. the ``entmax`` marker of sites that
  were not rewritten) is decomposed.

In both, the model's mutable state (KV caches, page statistics, counters) becomes inputs and
outputs (:mod:`.explicit_state`) named as optimum and onnxruntime-genai name them
(``past_key_values.{i}.key`` -> ``present.{i}.key``, :mod:`.naming`): feed the outputs back as
the inputs of the next step. The standard-op flavour also gets a statistics graph
(:mod:`.onnx_stats`) that computes the page statistics of a cache filled elsewhere; for an empty
cache, every state input is zeros.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from .explicit_state import ExplicitState, explicit_state_module, tensor_inputs
from .functional_ops import to_plugin_form
from .naming import STAT_FIELDS, state_names
from .onnx_simplify import simplify
from .onnx_schemas import DOMAIN, OPSET_VERSION, PLUGIN_VERSION, SCHEMAS, OpSpec, register_schemas
from .references import (
    STANDARD_OP_DECOMPOSITIONS,
    bool_cumprod,
    erf_rational,
    erfc_rational,
    prod_over_dims,
    substitute_references,
)

if TYPE_CHECKING:
    from ..compiler.rewrite import RewriteResult

__all__ = ["OnnxExport", "export_onnx"]

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class OnnxExport:
    """A saved ONNX decode step and how to feed it.

    Attributes:
        path: the ``.onnx`` file.
        explicit: the functional torch module the ONNX graph was traced from (the oracle) and its
            input/output names; ``explicit.state_values`` is the initial state.
        decomposed: True when the graph uses standard ONNX ops only.
        custom_nodes: ``op_type`` of each node of the ``entmaxkv`` domain, in graph order.
        stats_path: the statistics graph (:mod:`.onnx_stats`: page statistics of a filled cache,
            ``(seqlens, past_key_values.{i}.key...) -> past_page_stats.{i}.*``), or None.
    """

    path: Path
    explicit: ExplicitState
    decomposed: bool
    custom_nodes: tuple[str, ...]
    stats_path: Optional[Path] = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.explicit.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.explicit.output_names

    def feed(self, args: Sequence[Any], state: Optional[Sequence[torch.Tensor]] = None) -> dict[str, Any]:
        """The onnxruntime input dict for the step's ``args`` (state: the initial one unless given)."""
        state = self.explicit.state_values if state is None else tuple(state)
        args = tensor_inputs(args)
        tensors = (*state, *args)
        if len(tensors) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names) - len(state)} user inputs, got {len(args)}")
        return {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors)}

    def run_onnxruntime(self, args: Sequence[torch.Tensor], state: Optional[Sequence[torch.Tensor]] = None) -> list:
        """Run the saved model on onnxruntime's CPU provider; returns numpy arrays (state first)."""
        if not self.decomposed:
            raise RuntimeError(
                "this ONNX model uses custom-domain 'entmaxkv' nodes, which onnxruntime cannot run; "
                "export with decompose=True (CLI: --decompose) for onnxruntime"
            )
        import onnxruntime

        session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        return session.run(None, self.feed(args, state))

    def run_torch(self, args: Sequence[torch.Tensor], state: Optional[Sequence[torch.Tensor]] = None) -> list:
        """The same step in PyTorch (the functional module; state is cloned, not mutated)."""
        state = self.explicit.state_values if state is None else tuple(state)
        with torch.no_grad():
            outputs = self.explicit.module(*(t.clone() for t in state), *tensor_inputs(args))
        return [o.detach().cpu().numpy() for o in outputs]

    def max_abs_error(self, args: Sequence[torch.Tensor]) -> float:
        """Largest |onnxruntime - PyTorch| over every output (state included), in float64."""
        import numpy as np

        errors = [
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
            for a, b in zip(self.run_onnxruntime(args), self.run_torch(args))
        ]
        return max(errors, default=0.0)


def _translator(spec: OpSpec, op: Any) -> Callable[..., Any]:
    """An onnxscript translation of torch op ``op`` into the custom node ``spec``."""
    import onnxscript

    opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)
    arg_names = [argument.name for argument in op._schema.arguments]
    # torch.export leaves out trailing arguments at their defaults (e.g. ``softcap=0.0``)
    defaults = {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}
    input_names = [name for name, _ in spec.inputs]

    def translate(*args: Any, **kwargs: Any) -> Any:
        bound = defaults | dict(zip(arg_names, args)) | kwargs
        attributes = {name: bound[name] for name in spec.attribute_names}
        return getattr(opset, spec.name)(
            *(bound.get(name) for name in input_names),
            **attributes, plugin_namespace=DOMAIN, plugin_version=PLUGIN_VERSION,
        )

    translate.__signature__ = inspect.Signature(  # the exporter binds arguments by name
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in arg_names]
    )
    translate.__name__ = spec.name
    return translate


def custom_translation_table() -> dict[Any, Callable[..., Any]]:
    """``{torch op: translation}`` for every op kept as an ``entmaxkv`` custom node."""
    register_schemas()
    ops = [getattr(torch.ops.entmaxkv, spec.name).default for spec in SCHEMAS]
    return {op: _translator(spec, op) for spec, op in zip(SCHEMAS, ops)}


_WHERE = (torch.ops.aten.where.self, torch.ops.aten.where.ScalarSelf, torch.ops.aten.where.ScalarOther,
          torch.ops.aten.where.Scalar)


def _bool_where_to_logic(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``where(c, a, b)`` on bool values as ``(c & a) | (~c & b)``.

    onnxruntime has no bool kernel for ``Where``; the logic ops are exact. Returns the count.
    """
    aten = torch.ops.aten
    count = 0
    for node in list(gm.graph.nodes):
        value = node.meta.get("val")
        if node.target not in _WHERE or not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
            continue
        cond, a, b = node.args
        graph = gm.graph
        with graph.inserting_before(node):
            shape = list(value.shape)
            a, b = (graph.call_function(aten.full.default, (shape, bool(x)), {"dtype": torch.bool})
                    if not isinstance(x, torch.fx.Node) else x for x in (a, b))
            keep_a = graph.call_function(aten.logical_and.default, (cond, a))
            not_cond = graph.call_function(aten.logical_not.default, (cond,))
            keep_b = graph.call_function(aten.logical_and.default, (not_cond, b))
            result = graph.call_function(aten.logical_or.default, (keep_a, keep_b))
        result.meta["val"] = value
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _dtype(node: Any) -> Optional[torch.dtype]:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _standard_op_forms(gm: torch.fx.GraphModule) -> int:
    """Point the calls ONNX / onnxruntime cannot take at standard-op forms; returns the count.

    float64 ``erf``/``erfc`` (onnxruntime's ``Erf`` is float32 only; the Gaussian selector
    evaluates normal CDFs in float64) become :func:`.references.erfc_rational` (relative error
    1.2e-7, tails included); ``prims.prod`` (left by some decompositions, e.g. of ``all``; no ONNX
    translation) becomes ``aten.prod`` per dim; ``cumprod`` of bools (ONNX has no CumProd)
    becomes a ``CumSum`` of the negation.
    """
    float64_forms = {torch.ops.aten.erf.default: erf_rational, torch.ops.aten.erfc.default: erfc_rational}
    count = 0
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.target == torch.ops.prims.prod.default:
            node.target = prod_over_dims
        elif node.target == torch.ops.aten.cumprod.default and _dtype(node.args[0]) == torch.bool:
            node.target = bool_cumprod
        elif node.target in float64_forms and isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            node.target = float64_forms[node.target]
        else:
            continue
        count += 1
    if count:
        gm.recompile()
    return count


def _prepare(gm: torch.fx.GraphModule, decompose: bool) -> None:
    if decompose:
        substitute_references(gm)
    else:
        to_plugin_form(gm)
        kept = frozenset(getattr(torch.ops.entmaxkv, spec.name).default for spec in SCHEMAS)
        substitute_references(gm, keep=kept)


def export_onnx(
    result: "RewriteResult",
    path: str | Path,
    *,
    decompose: bool = True,
    check: bool = True,
    opset_version: Optional[int] = None,
    stats_graph: bool = True,
    progress: Optional[ProgressFn] = None,
) -> OnnxExport:
    """Export the rewritten decode step of ``result`` to ``path`` as ONNX.

    ``decompose``: standard ops only (onnxruntime) or ``entmaxkv`` custom nodes (TensorRT plugins).
    ``check``: run ``onnx.checker`` (full check, with shape inference) on the saved file.
    ``stats_graph``: with ``decompose``, also write ``<path stem>.stats.onnx``, the graph that
    computes the page statistics of a filled cache (:mod:`.onnx_stats`).
    State inputs and outputs carry the ecosystem names (:mod:`.naming`): ``past_key_values.{i}.key``
    / ``.value`` and ``present.{i}.key`` / ``.value`` for the caches of rewritten layer ``i``,
    ``past_page_stats.{i}.*`` / ``present_page_stats.{i}.*`` for their statistics, ``past.<name>``
    / ``present.<name>`` for other state.
    The program's state is not modified; ``OnnxExport.explicit.state_values`` is its current value.
    """
    import onnx

    from .progress import stage

    path = Path(path)
    args = tuple(result.example_args)
    inputs = tensor_inputs(args)
    with stage(progress, "tracing the rewritten step for ONNX"):
        gm = result.program.module()
        _prepare(gm, decompose)
        table = torch.export.default_decompositions()
        table.update(STANDARD_OP_DECOMPOSITIONS)
        functional = torch.export.export(gm, args, strict=False).run_decompositions(table)
        explicit = _with_ecosystem_names(explicit_state_module(functional, result.input_names),
                                         state_names(result.program))
        _bool_where_to_logic(explicit.module)
        _standard_op_forms(explicit.module)
    with stage(progress, f"translating to ONNX ({'standard ops' if decompose else 'custom domain entmaxkv'})"):
        table = None if decompose else custom_translation_table()
        program = torch.onnx.export(
            explicit.module, (*explicit.state_values, *inputs), dynamo=True, verbose=False,
            input_names=list(explicit.input_names), output_names=list(explicit.output_names),
            custom_translation_table=table, opset_version=opset_version, optimize=False,
        )
    with stage(progress, f"simplifying the ONNX graph ({len(program.model.graph)} nodes)"):
        simplify(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    model = onnx.load(str(path), load_external_data=False)
    if check:
        with stage(progress, "checking the ONNX model (onnx.checker, full check)"):
            register_schemas()
            onnx.checker.check_model(str(path), full_check=True)
    custom = tuple(node.op_type for node in model.graph.node if node.domain == DOMAIN)
    if decompose and custom:
        raise RuntimeError(f"decomposed ONNX model still has custom nodes {custom}")
    stats_path = None
    if decompose and stats_graph:
        stats_path = _write_stats_graph(result, explicit, path.with_name(f"{path.stem}.stats.onnx"),
                                        opset_version, progress)
    return OnnxExport(path=path, explicit=explicit, decomposed=decompose, custom_nodes=custom,
                      stats_path=stats_path)


def _with_ecosystem_names(explicit: ExplicitState, names: dict[str, tuple[str, str]]) -> ExplicitState:
    """``explicit`` with its state inputs and outputs renamed by ``names`` (others unchanged)."""
    count = len(explicit.state)
    inputs = tuple(names.get(fqn, (old, None))[0] for fqn, old in zip(explicit.state, explicit.input_names))
    outputs = tuple(names.get(fqn, (None, old))[1] for fqn, old in zip(explicit.state, explicit.output_names))
    return dataclasses.replace(explicit, input_names=inputs + explicit.input_names[count:],
                               output_names=outputs + explicit.output_names[count:])


def _write_stats_graph(result: "RewriteResult", explicit: ExplicitState, path: Path,
                       opset_version: Optional[int], progress: Optional[ProgressFn]) -> Optional[Path]:
    """The statistics graph of the step's rewritten layers (None when it has none)."""
    from .onnx_stats import export_stats_onnx

    value = dict(zip(explicit.input_names, explicit.state_values))
    layers = 0
    while f"past_key_values.{layers}.key" in value:
        layers += 1
    if not layers:
        return None
    k_caches = [value[f"past_key_values.{i}.key"] for i in range(layers)]
    stats = [[value[f"past_page_stats.{i}.{field}"] for field in STAT_FIELDS] for i in range(layers)]
    return export_stats_onnx(path, result.config.page_size, k_caches, stats, opset_version=opset_version,
                             progress=progress).path
