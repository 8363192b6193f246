"""ONNX schemas of the custom domain ``entmaxkv`` (one per exported op).

Each custom node carries what a TensorRT plugin lookup needs: its ``op_type`` is the plugin name
(the name of the torch op's export form, e.g. ``decode_step_plugin``, see :mod:`.functional_ops`,
which is also the name of the TensorRT plugin ``entmaxkv::decode_step_plugin``),
``plugin_namespace`` = ``"entmaxkv"`` and ``plugin_version`` = ``"1"`` (the attributes TensorRT's
ONNX parser reads when it falls back to a plugin), and every scalar argument of the torch op as an
attribute of the same name (the plugin's fields). The schemas are registered with
``onnx.defs.register_schema`` so that onnxscript can build the nodes and ``onnx.checker`` can
validate them; :func:`register_schemas` is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx.defs import OpSchema

__all__ = ["DOMAIN", "OPSET_VERSION", "PLUGIN_VERSION", "SCHEMAS", "OpSpec", "register_schemas"]

DOMAIN = "entmaxkv"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"

_FLOAT_TYPES = ["tensor(float16)", "tensor(bfloat16)", "tensor(float)", "tensor(double)"]
_INDEX_TYPES = ["tensor(int32)", "tensor(int64)"]
_ATTR = OpSchema.AttrType


@dataclass(frozen=True)
class OpSpec:
    """One custom op: its inputs ``(name, type string)``, outputs and scalar attributes."""

    name: str
    doc: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[str, OpSchema.AttrType], ...]

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.attributes)


_STATS_IO = (("kmin", "T"), ("kmax", "T"), ("kmean", "tensor(float)"), ("km2", "tensor(float)"))
_STATS_OUT = tuple((f"{name}_out", type_str) for name, type_str in _STATS_IO)

SCHEMAS: tuple[OpSpec, ...] = (
    OpSpec(
        name="decode_step_plugin",
        doc="Sparse entmax decode step: select KV pages from their statistics, attend, certify. "
            "alibi_slopes are zeros for models without ALiBi.",
        inputs=(("q", "T"), ("k_cache", "T"), ("v_cache", "T"), ("seqlens", "I"), *_STATS_IO,
                ("alibi_slopes", "tensor(float)")),
        outputs=(("out", "T"), ("page_indices", "tensor(int32)"), ("num_selected", "tensor(int32)"),
                 ("certified", "tensor(bool)"), ("delta_bound", "tensor(float)")),
        attributes=(("scale", _ATTR.FLOAT), ("alpha", _ATTR.FLOAT), ("page_size", _ATTR.INT),
                    ("selector", _ATTR.STRING), ("token_budget", _ATTR.INT), ("max_quantile", _ATTR.FLOAT),
                    ("margin", _ATTR.FLOAT), ("tau_estimate", _ATTR.STRING), ("sink_pages", _ATTR.INT),
                    ("recent_pages", _ATTR.INT), ("certify_max_rounds", _ATTR.INT), ("min_context", _ATTR.INT),
                    ("softcap", _ATTR.FLOAT)),
    ),
    OpSpec(
        name="page_stats_append_functional",
        doc="Fold the K row written at positions[b] into its page statistics; returns the new stats.",
        inputs=(("k_cache", "T"), ("positions", "I"), *_STATS_IO),
        outputs=_STATS_OUT,
        attributes=(("page_size", _ATTR.INT),),
    ),
    OpSpec(
        name="page_stats_prefill_functional",
        doc="Page statistics of the first seqlens[b] rows of the K cache; returns the new stats.",
        inputs=(("k_cache", "T"), ("seqlens", "I"), *_STATS_IO),
        outputs=_STATS_OUT,
        attributes=(("page_size", _ATTR.INT),),
    ),
)

_PLUGIN_ATTRIBUTES = (("plugin_namespace", "TensorRT plugin namespace"), ("plugin_version", "TensorRT plugin version"))


def _schema(spec: OpSpec) -> OpSchema:
    inputs = [OpSchema.FormalParameter(name, type_str) for name, type_str in spec.inputs]
    outputs = [OpSchema.FormalParameter(name, type_str) for name, type_str in spec.outputs]
    attributes = [OpSchema.Attribute(name, attr_type, name) for name, attr_type in spec.attributes]
    attributes += [
        OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)
        for (name, doc), default in zip(_PLUGIN_ATTRIBUTES, (DOMAIN, PLUGIN_VERSION))
    ]
    return OpSchema(
        spec.name, DOMAIN, OPSET_VERSION, spec.doc,
        inputs=inputs, outputs=outputs,
        type_constraints=[("T", _FLOAT_TYPES, "cache and query dtype"), ("I", _INDEX_TYPES, "index dtype")],
        attributes=attributes,
    )


def register_schemas() -> None:
    """Register every ``entmaxkv`` schema with ONNX (once per process)."""
    for spec in SCHEMAS:
        if not onnx.defs.has(spec.name, DOMAIN):
            onnx.defs.register_schema(_schema(spec))
