"""Export forms of the ``entmaxkv`` ops: functional, tensors first, no optional inputs.

Graphs for ONNX custom domains and TensorRT plugins need ops that

- have no mutable state: ``page_stats_append`` / ``page_stats_prefill`` update four buffers in
  place, which is right for the compiled step (no copies) but an ONNX / TensorRT graph has no
  mutable buffers. The twins ``entmaxkv::page_stats_append_functional`` and
  ``entmaxkv::page_stats_prefill_functional`` *return* the updated ``(kmin, kmax, kmean, km2)``;
- take every tensor before every attribute, and no optional tensor: TensorRT's quick-deploy
  plugins (and torch-tensorrt's generated converters) require ``(tensors..., attributes...)``.
  ``entmaxkv::decode_step_plugin`` is ``decode_step`` with ALiBi slopes always present (zeros
  when the model has no ALiBi: the bias ``0 * (j - i)`` is exactly 0) and ``tau_estimate``
  resolved (``"auto"`` means "mixture iff ALiBi", which zeros would otherwise flip).

:func:`to_plugin_form` rewrites an FX graph to use them. Each form calls the original op, so it
runs the same kernels on every device.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from ..runtime.ops import decode_step_outputs_like  # also registers the base ops wrapped here

__all__ = [
    "PLUGIN_FORMS",
    "decode_step_plugin",
    "page_stats_append_functional",
    "page_stats_prefill_functional",
    "to_plugin_form",
]

Stats = tuple[Tensor, Tensor, Tensor, Tensor]
_STAT_NAMES = ("kmin", "kmax", "kmean", "km2")


def _clone_stats(kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor) -> Stats:
    return kmin.clone(), kmax.clone(), kmean.clone(), km2.clone()


@torch.library.custom_op("entmaxkv::page_stats_append_functional", mutates_args=())
def page_stats_append_functional(
    k_cache: Tensor, positions: Tensor, kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor, page_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``page_stats_append`` that returns the updated statistics instead of writing them."""
    out = _clone_stats(kmin, kmax, kmean, km2)
    torch.ops.entmaxkv.page_stats_append(k_cache, positions, page_size, *out)
    return out


@torch.library.custom_op("entmaxkv::page_stats_prefill_functional", mutates_args=())
def page_stats_prefill_functional(
    k_cache: Tensor, seqlens: Tensor, kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor, page_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``page_stats_prefill`` that returns the filled statistics instead of writing them."""
    out = _clone_stats(kmin, kmax, kmean, km2)
    torch.ops.entmaxkv.page_stats_prefill(k_cache, seqlens, page_size, *out)
    return out


def _fake_stats(k_cache, index, kmin, kmax, kmean, km2, page_size) -> Stats:  # noqa: ANN001
    return (torch.empty_like(kmin), torch.empty_like(kmax), torch.empty_like(kmean), torch.empty_like(km2))


page_stats_append_functional.register_fake(_fake_stats)
page_stats_prefill_functional.register_fake(_fake_stats)


@torch.library.custom_op("entmaxkv::decode_step_plugin", mutates_args=())
def decode_step_plugin(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, kmin: Tensor, kmax: Tensor,
    kmean: Tensor, km2: Tensor, alibi_slopes: Tensor, scale: float, alpha: float, page_size: int,
    selector: str, token_budget: int, max_quantile: float, margin: float, tau_estimate: str,
    sink_pages: int, recent_pages: int, certify_max_rounds: int, min_context: int, softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``decode_step`` with ALiBi slopes always given (zeros = none) and ``tau_estimate`` resolved
    (``softcap`` last, as in ``decode_step``; 0.0 = no cap)."""
    return torch.ops.entmaxkv.decode_step(
        q, k_cache, v_cache, seqlens, kmin, kmax, kmean, km2, alibi_slopes, scale, alpha, page_size,
        selector, token_budget, max_quantile, margin, tau_estimate, sink_pages, recent_pages,
        certify_max_rounds, min_context, softcap=softcap,
    )


@decode_step_plugin.register_fake
def _(q, k_cache, v_cache, seqlens, kmin, *rest):  # noqa: ANN001
    return decode_step_outputs_like(q, kmin)


def _bound_args(node: torch.fx.Node) -> dict:
    names = [argument.name for argument in node.target._schema.arguments]
    return dict(zip(names, node.args)) | dict(node.kwargs)


def _stats_twin(graph: torch.fx.Graph, node: torch.fx.Node, twin) -> None:  # noqa: ANN001
    bound = _bound_args(node)
    index_name = "positions" if "positions" in bound else "seqlens"
    stats = [bound[name] for name in _STAT_NAMES]
    with graph.inserting_before(node):
        call = graph.call_function(twin, (bound["k_cache"], bound[index_name], *stats, bound["page_size"]))
        for i, buffer in enumerate(stats):
            new = graph.call_function(operator.getitem, (call, i))
            graph.call_function(torch.ops.aten.copy_.default, (buffer, new))
    graph.erase_node(node)


def _decode_twin(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    bound = _bound_args(node)
    if bound.get("row_start") is not None:
        raise ValueError(f"{node.name}: decode_step has a row_start (a left-padded batch); the plugin form used by "
                         "the ONNX and TensorRT exports takes no per-row first position yet: export a graph "
                         "traced without left padding, or use the AOTInductor export")
    alibi = bound["alibi_slopes"]
    tau_estimate = bound["tau_estimate"]
    if tau_estimate == "auto":
        tau_estimate = "global" if alibi is None else "mixture"
    with graph.inserting_before(node):
        if alibi is None:
            q = bound["q"]
            alibi = graph.call_function(torch.ops.aten.new_zeros.default, (q, [q.meta["val"].shape[1]]),
                                        {"dtype": torch.float32})
        bound.update(alibi_slopes=alibi, tau_estimate=tau_estimate)
        bound.setdefault("softcap", 0.0)  # a call that left the cap at its default
        names = [argument.name for argument in torch.ops.entmaxkv.decode_step_plugin.default._schema.arguments]
        call = graph.call_function(torch.ops.entmaxkv.decode_step_plugin.default, tuple(bound[n] for n in names))
    node.replace_all_uses_with(call)
    graph.erase_node(node)


PLUGIN_FORMS = {
    torch.ops.entmaxkv.page_stats_append.default: torch.ops.entmaxkv.page_stats_append_functional.default,
    torch.ops.entmaxkv.page_stats_prefill.default: torch.ops.entmaxkv.page_stats_prefill_functional.default,
    torch.ops.entmaxkv.decode_step.default: torch.ops.entmaxkv.decode_step_plugin.default,
}


#: Ops with no plugin form yet (a rolling buffer's page rebuild): refused by name.
_NO_PLUGIN_FORM = (torch.ops.entmaxkv.page_stats_rebuild.default,)


def to_plugin_form(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm`` in place to the export forms; returns the number of calls replaced.

    Stats updates become ``twin(...)`` plus ``buffer.copy_(new)`` (the buffers keep their
    identity, so later reads see the new values and ``torch.export`` lists them as mutated state);
    ``decode_step`` becomes ``decode_step_plugin``.
    """
    graph = gm.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _NO_PLUGIN_FORM:
            raise ValueError(f"{node.name}: {node.target.name()} keeps a rolling-buffer cache's statistics; the "
                             "plugin form used by the ONNX custom domain and TensorRT has no page rebuild yet: use "
                             "the decomposed ONNX export or the AOTInductor export")
        if node.op != "call_function" or node.target not in PLUGIN_FORMS:
            continue
        if node.target == torch.ops.entmaxkv.decode_step.default:
            _decode_twin(graph, node)
        else:
            _stats_twin(graph, node, PLUGIN_FORMS[node.target])
        replaced += 1
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced
