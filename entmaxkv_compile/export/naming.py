"""Ecosystem names for the state of an exported decode step.

Runtimes and tools around ONNX decoders (optimum, onnxruntime-genai) find the KV cache of layer
``i`` by name: inputs ``past_key_values.{i}.key`` / ``past_key_values.{i}.value``, outputs
``present.{i}.key`` / ``present.{i}.value``. :func:`state_names` gives those names to the caches
the rewritten attention sites read (layer ``i`` = the ``i``-th rewritten site in graph order), and
``past_page_stats.{i}.{kmin,kmax,kmean,km2}`` / ``present_page_stats.{i}.*`` to the page
statistics of their K caches. Any other state (e.g. a position counter) keeps
``past.<name>`` / ``present.<name>``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.export.graph_signature import InputKind

__all__ = ["STAT_FIELDS", "buffer_of", "mutated_buffers", "state_names"]

#: The page statistics of one K cache, in the order ``decode_step`` takes them.
STAT_FIELDS = ("kmin", "kmax", "kmean", "km2")


def _aliases_first_argument(node: Any) -> bool:
    """True when ``node`` is a view of, or an in-place op on, its first argument."""
    schema = getattr(getattr(node, "target", None), "_schema", None)
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and schema is not None
            and bool(node.args) and bool(schema.arguments) and schema.arguments[0].alias_info is not None)


def _buffers(program: torch.export.ExportedProgram) -> dict[str, str]:
    return {spec.arg.name: spec.target for spec in program.graph_signature.input_specs
            if spec.kind == InputKind.BUFFER}


def buffer_of(node: Any, buffers: dict[str, str]) -> Optional[str]:
    """The buffer ``node`` is (or views, or is an in-place result of), by fully qualified name."""
    while _aliases_first_argument(node):
        node = node.args[0]
    return buffers.get(getattr(node, "name", None))


def mutated_buffers(program: torch.export.ExportedProgram) -> tuple[str, ...]:
    """The buffers a (training-IR) program writes in place, in the program's input order."""
    buffers = _buffers(program)
    written: set[str] = set()
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for argument, value in zip(schema.arguments, node.args):
            if argument.alias_info is not None and argument.alias_info.is_write:
                name = buffer_of(value, buffers)
                if name is not None:
                    written.add(name)
    return tuple(spec.target for spec in program.graph_signature.input_specs if spec.target in written)


def state_names(program: torch.export.ExportedProgram) -> dict[str, tuple[str, str]]:
    """``{buffer name: (input name, output name)}`` for the caches and statistics of each rewritten site.

    ``program`` is the rewritten program of ``rewrite`` (its ``decode_step`` calls name the
    caches and statistics of each site). Buffers it cannot attribute are left out.
    """
    buffers = _buffers(program)
    names: dict[str, tuple[str, str]] = {}
    layer = 0
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.entmaxkv.decode_step.default:
            continue
        key, value = buffer_of(node.args[1], buffers), buffer_of(node.args[2], buffers)
        stats = [buffer_of(arg, buffers) for arg in node.args[4:8]]
        if key is None or value is None or key in names or None in stats:
            continue
        names[key] = (f"past_key_values.{layer}.key", f"present.{layer}.key")
        names[value] = (f"past_key_values.{layer}.value", f"present.{layer}.value")
        for field, stat in zip(STAT_FIELDS, stats):
            names[stat] = (f"past_page_stats.{layer}.{field}", f"present_page_stats.{layer}.{field}")
        layer += 1
    return names
