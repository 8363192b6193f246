"""Capture the Dynamo graphs of a call, for pass tests and experiments."""

from __future__ import annotations

from typing import Any, Callable

import torch

from entmaxkv_compile.compiler.capture import install_capture


def capture_graphs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[tuple[torch.fx.GraphModule, list[Any]]]:
    """Run ``fn(*args, **kwargs)`` under Dynamo; return each graph with a copy of its inputs.

    Inputs are cloned *before* the call runs, so they hold the state the graph saw (caches
    before this step's write). The call itself runs eagerly, with its usual side effects.
    """
    install_capture()
    graphs: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]
        graphs.append((gm, inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend)(*args, **kwargs)
    return graphs
