"""Turn a program's mutable state into explicit inputs and outputs (the "past/present" convention).

A rewritten decode step updates state in place: the KV caches, the page statistics, sometimes a
position counter. ONNX and TensorRT graphs have no mutable buffers; exported as-is, the mutations
are silently dropped (the caches become constant initializers). :func:`explicit_state_module`
takes a *functional* ``ExportedProgram`` (after ``run_decompositions``, where every mutation is a
``BUFFER_MUTATION`` output) and builds a plain graph module whose signature is

    (*past_state, *user_inputs) -> (*present_state, *user_outputs)

with ``past_state`` / ``present_state`` the mutated buffers in the same order. Parameters and
buffers that are only read stay inside as constants.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

__all__ = ["ExplicitState", "explicit_state_module", "tensor_inputs"]


@dataclass(frozen=True)
class ExplicitState:
    """A functional decode step and the names of its inputs and outputs.

    Attributes:
        module: ``(*state, *inputs) -> (*new_state, *outputs)``.
        state: fully qualified names of the state buffers, in input (and output) order.
        state_values: the buffers' current values, to feed as the first inputs.
        input_names: names of every input (``past.<fqn>`` for state, then the user inputs).
        output_names: names of every output (``present.<fqn>`` for state, then ``output_<i>``).
    """

    module: torch.fx.GraphModule
    state: tuple[str, ...]
    state_values: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def _attr_name(fqn: str) -> str:
    return "c_" + re.sub(r"\W", "_", fqn)


def _lookup(program: ExportedProgram, fqn: str) -> torch.Tensor:
    """A parameter, persistent buffer or non-persistent buffer / constant of ``program``."""
    return program.state_dict[fqn] if fqn in program.state_dict else program.constants[fqn]


def explicit_state_module(program: ExportedProgram, input_names: Sequence[str] = ()) -> ExplicitState:
    """Build the ``(*state, *inputs) -> (*new_state, *outputs)`` module of a functional program.

    ``input_names`` renames the user inputs (when given, one name per user input).

    Raises ``ValueError`` when the program is not functional (run ``run_decompositions`` first) or
    mutates a user input (pass state as module buffers instead).
    """
    signature = program.graph_signature
    outputs_by_kind: dict[OutputKind, list] = {}
    for spec in signature.output_specs:
        outputs_by_kind.setdefault(spec.kind, []).append(spec)
    unsupported = set(outputs_by_kind) - {OutputKind.BUFFER_MUTATION, OutputKind.USER_OUTPUT}
    if unsupported:
        raise ValueError(
            f"program outputs of kind {sorted(k.name for k in unsupported)} are not supported; "
            "only buffer mutations and user outputs can become explicit state"
        )
    mutations = outputs_by_kind.get(OutputKind.BUFFER_MUTATION, [])
    state = tuple(spec.target for spec in mutations)
    if any(node.op == "call_function" and getattr(node.target, "_schema", None) is not None
           and node.target._schema.is_mutable for node in program.graph.nodes):
        raise ValueError("program still contains in-place ops; call run_decompositions() first")

    root = torch.nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    old_placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    spec_by_target = {
        spec.target: spec for spec in signature.input_specs if spec.kind == InputKind.BUFFER
    }
    for fqn in state:
        old = old_placeholders[spec_by_target[fqn].arg.name]
        env[old] = graph.placeholder(_attr_name(fqn)[2:])
        env[old].meta = dict(old.meta)
    for spec in signature.input_specs:
        old = old_placeholders[spec.arg.name]
        if old in env:
            continue
        if spec.kind == InputKind.USER_INPUT and not isinstance(spec.arg, TensorArgument):
            env[old] = spec.arg.value  # a None (or other constant) argument is not a graph input
        elif spec.kind == InputKind.USER_INPUT:
            env[old] = graph.placeholder(old.name)
            env[old].meta = dict(old.meta)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            tensor = _lookup(program, spec.target)
            name = _attr_name(spec.target)
            root.register_buffer(name, tensor.detach())
            env[old] = graph.get_attr(name)
            env[old].meta = dict(old.meta)
        else:
            raise ValueError(f"input {spec.arg.name} of kind {spec.kind.name} cannot be made explicit")

    output_node = None
    for node in program.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output_node = node
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    assert output_node is not None
    by_kind: dict[OutputKind, list] = {OutputKind.BUFFER_MUTATION: [], OutputKind.USER_OUTPUT: []}
    for spec, arg in zip(signature.output_specs, output_node.args[0]):
        by_kind[spec.kind].append(env[arg] if isinstance(arg, torch.fx.Node) else arg)
    graph.output(tuple(by_kind[OutputKind.BUFFER_MUTATION] + by_kind[OutputKind.USER_OUTPUT]))
    graph.lint()
    module = torch.fx.GraphModule(root, graph).eval()

    user_inputs = [spec.arg.name for spec in signature.input_specs
                   if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, TensorArgument)]
    if input_names:
        if len(input_names) != len(user_inputs):
            raise ValueError(f"input_names must name the {len(user_inputs)} user inputs, got {list(input_names)}")
        user_inputs = list(input_names)
    user_outputs = len(outputs_by_kind.get(OutputKind.USER_OUTPUT, []))
    return ExplicitState(
        module=module,
        state=state,
        state_values=tuple(_lookup(program, fqn) for fqn in state),
        input_names=tuple(f"past.{fqn}" for fqn in state) + tuple(user_inputs),
        output_names=tuple(f"present.{fqn}" for fqn in state) + tuple(f"output_{i}" for i in range(user_outputs)),
    )


def tensor_inputs(args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """The tensors among the step's arguments (``None`` arguments are not graph inputs)."""
    leaves = torch.utils._pytree.tree_leaves(tuple(args))
    for i, value in enumerate(leaves):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"an exported step needs tensor (or None) arguments; argument leaf {i} is {type(value).__name__} "
                "(pass it as a tensor, or bind it in the factory)"
            )
    return tuple(value for value in leaves if value is not None)
