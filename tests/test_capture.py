"""Capture: known entmax calls trace to the marker op; eager calls are untouched."""

from __future__ import annotations

import entmax
import pytest
import torch

import entmaxkv_compile
from entmaxkv_compile.math import reference
from entmaxkv_compile.compiler.capture import install_capture
from entmaxkv_compile.compiler.passes.ir import op_of


def _graphs_of(fn, *args, fullgraph=True):
    """Trace ``fn`` with Dynamo and return the captured graphs (run eagerly)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=fullgraph)(*args)
    return graphs, out


def _markers(gm):
    return [n for n in gm.graph.nodes if op_of(n) == "entmax"]


_MODULE_15 = entmax.Entmax15(dim=-1)
_MODULE_SPARSE = entmax.Sparsemax(dim=1)
_MODULE_BISECT = entmax.EntmaxBisect(alpha=1.25, dim=-1)

CASES = [
    ("entmax15", lambda x: entmax.entmax15(x, dim=-1), 1.5, -1),
    ("entmax15 positional k", lambda x: entmax.entmax15(x, -1, 3), 1.5, -1),
    ("sparsemax", lambda x: entmax.sparsemax(x, dim=-1), 2.0, -1),
    ("entmax_bisect 1.25", lambda x: entmax.entmax_bisect(x, alpha=1.25, dim=-1, n_iter=30), 1.25, -1),
    ("entmax_bisect 4/3", lambda x: entmax.entmax_bisect(x, 4 / 3), 4 / 3, -1),
    ("sparsemax_bisect", lambda x: entmax.sparsemax_bisect(x, dim=-1), 2.0, -1),
    ("Entmax15 module", lambda x: _MODULE_15(x), 1.5, -1),
    ("Sparsemax module dim=1", lambda x: _MODULE_SPARSE(x), 2.0, 1),
    ("EntmaxBisect module", lambda x: _MODULE_BISECT(x), 1.25, -1),
    ("entmaxkv_compile.entmax", lambda x: entmaxkv_compile.entmax(x, alpha=1.5, dim=-1), 1.5, -1),
    ("entmaxkv_compile.entmax alpha=2", lambda x: entmaxkv_compile.entmax(x, 2.0), 2.0, -1),
]


@pytest.mark.parametrize("name,fn,alpha,dim", CASES, ids=[c[0] for c in CASES])
def test_known_entmax_traces_to_one_marker(name, fn, alpha, dim):
    install_capture()
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(len(name))) * 3
    (gm,), out = _graphs_of(lambda t: fn(t) * 1.0, x)
    markers = _markers(gm)
    assert len(markers) == 1, gm.code
    assert markers[0].args[1] == pytest.approx(alpha)
    assert markers[0].args[2] == dim
    assert not any(op_of(n) in ("pow", "clamp") for n in gm.graph.nodes), "entmax was inlined"
    torch.testing.assert_close(out, reference.entmax(x.double(), alpha, dim).float(), atol=1e-5, rtol=1e-5)


def test_masked_own_entmax_becomes_marker_over_masked_scores():
    install_capture()
    x = torch.randn(2, 9, generator=torch.Generator().manual_seed(3))
    mask = torch.arange(9) < 6
    (gm,), out = _graphs_of(lambda t: entmaxkv_compile.entmax(t, 1.5, -1, mask), x)
    assert len(_markers(gm)) == 1
    assert torch.all(out[:, 6:] == 0)
    torch.testing.assert_close(out, reference.entmax(x, 1.5, -1, mask), atol=1e-6, rtol=1e-6)


def test_tensor_alpha_bisect_is_not_captured_but_still_correct():
    install_capture()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    alpha = torch.full((4, 1), 1.5)
    graphs, out = _graphs_of(lambda t: entmax.entmax_bisect(t, alpha, -1, 40), x, fullgraph=False)
    assert not any(_markers(gm) for gm in graphs)
    torch.testing.assert_close(out, entmax.entmax_bisect(x, alpha, -1, 40))


def test_eager_calls_are_untouched_and_install_is_idempotent():
    first = install_capture()
    assert install_capture() == first
    assert "entmax.entmax15" in first and "entmaxkv_compile.entmax" in first
    x = torch.randn(3, 8)
    torch.testing.assert_close(entmax.entmax15(x), entmax.activations.Entmax15Function.apply(x, -1, None))
