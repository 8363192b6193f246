"""Cut a pure subgraph out of an FX graph so it can be run on its own.

Used to confirm a hand-written entmax numerically (run the candidate on random scores) and to
evaluate a decode step's position tensor outside the compiled graph.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.fx import Graph, GraphModule, Node

from .ir import ancestors, is_impure


class NotExtractable(ValueError):
    """The requested subgraph depends on something it may not (a side effect, another input)."""


def extract(
    gm: GraphModule, inputs: Sequence[Node], output: Node, *, allow_placeholders: bool = False
) -> GraphModule:
    """A GraphModule computing ``output`` from ``inputs`` (its placeholders, in that order).

    Every other dependency must be free of side effects and, unless ``allow_placeholders``, of the
    original graph's inputs. With ``allow_placeholders``, original placeholders the output needs
    become extra inputs after ``inputs``; their order is given by :func:`needed_placeholders`.
    """
    needed = ancestors(output, stop=inputs) | {output}
    graph = Graph()
    env: dict[Node, Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    extra = needed_placeholders(gm, inputs, output)
    if extra and not allow_placeholders:
        raise NotExtractable(f"depends on graph input(s) {[n.name for n in extra]}")
    for node in extra:
        env[node] = graph.placeholder(node.name)
    for node in gm.graph.nodes:
        if node not in needed or node in env:
            continue
        if node.op == "get_attr":
            raise NotExtractable(f"reads module attribute {node.target}")
        if is_impure(node):
            raise NotExtractable(f"has a side effect ({node.format_node()})")
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[output])
    return GraphModule(torch.nn.Module(), graph)


def needed_placeholders(gm: GraphModule, inputs: Sequence[Node], output: Node) -> list[Node]:
    """The original graph inputs (other than ``inputs``) that ``output`` depends on, in order."""
    needed = ancestors(output, stop=inputs) | {output}
    return [n for n in gm.graph.nodes if n.op == "placeholder" and n in needed and n not in inputs]


def try_extract(gm: GraphModule, inputs: Sequence[Node], output: Node) -> tuple[Optional[GraphModule], str]:
    """:func:`extract`, returning ``(None, reason)`` instead of raising."""
    try:
        return extract(gm, inputs, output), ""
    except NotExtractable as exc:
        return None, str(exc)
