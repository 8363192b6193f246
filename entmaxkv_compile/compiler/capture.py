"""Make known entmax functions appear as one marker op while Dynamo traces.

Without help, Dynamo inlines ``entmax.entmax15`` into ~30 aten ops (sort, cumsum, sqrt, ...) and
unrolls ``entmax_bisect``'s 50-step loop, which hides the entmax from the graph passes. A
``torch.compiler.substitute_in_graph`` polyfill swaps each known function for
``torch.ops.entmaxkv.entmax(x, alpha, dim)`` *only while tracing*; eager calls are untouched.

The modules ``Entmax15``, ``Sparsemax`` and ``EntmaxBisect`` call these functions from their
``forward``, so they are captured through them. ``entmax_bisect`` with a tensor alpha (per head)
becomes ``torch.ops.entmaxkv.entmax_alpha`` (``markers.py``). :func:`install_capture` is idempotent and runs
when the backend module is imported (which ``torch.compile(backend="entmaxkv")`` does before
tracing).
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any, Callable

import torch

_INSTALLED: list[str] = []
_DONE = False


def _marker(x: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
    return torch.ops.entmaxkv.entmax(x, float(alpha), int(dim))


def _substitute(original: Callable[..., Any], polyfill: Callable[..., Any], name: str) -> None:
    torch.compiler.substitute_in_graph(original, skip_signature_check=True)(polyfill)
    _INSTALLED.append(name)


def _install_entmax_package() -> None:
    try:
        activations = importlib.import_module("entmax.activations")
        root_finding = importlib.import_module("entmax.root_finding")
    except ImportError:
        return

    def entmax15(X, dim=-1, k=None):  # noqa: N803 - mirrors the entmax package signature
        return _marker(X, 1.5, dim)

    def sparsemax(X, dim=-1, k=None):  # noqa: N803
        return _marker(X, 2.0, dim)

    def entmax_bisect(X, alpha=1.5, dim=-1, n_iter=50, ensure_sum_one=True):  # noqa: N803
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and alpha > 1:
            return _marker(X, float(alpha), dim)
        if isinstance(alpha, torch.Tensor):  # a per-head alpha: its own marker (markers.py)
            return torch.ops.entmaxkv.entmax_alpha(X, alpha, int(dim), int(n_iter), bool(ensure_sum_one))
        return root_finding.EntmaxBisectFunction.apply(X, alpha, dim, n_iter, ensure_sum_one)

    def sparsemax_bisect(X, dim=-1, n_iter=50, ensure_sum_one=True):  # noqa: N803
        return _marker(X, 2.0, dim)

    _substitute(activations.entmax15, entmax15, "entmax.entmax15")
    _substitute(activations.sparsemax, sparsemax, "entmax.sparsemax")
    _substitute(root_finding.entmax_bisect, entmax_bisect, "entmax.entmax_bisect")
    _substitute(root_finding.sparsemax_bisect, sparsemax_bisect, "entmax.sparsemax_bisect")


def _install_own() -> None:
    """Our public ``entmaxkv_compile.entmax`` (the reference) traces to the marker as well."""
    reference = importlib.import_module("entmaxkv_compile.math.reference")
    own = getattr(reference, "entmax", None)
    if own is None:
        return

    def entmax(x, alpha=1.5, dim=-1, mask=None):
        if mask is not None:  # ``mask`` marks the valid entries; invalid ones get weight 0
            x = x.masked_fill(~mask, float("-inf"))
        return _marker(x, alpha, dim)

    _substitute(own, entmax, "entmaxkv_compile.entmax")


def install_capture() -> tuple[str, ...]:
    """Register the marker-op polyfills once; return the names of the captured functions."""
    global _DONE
    if not _DONE:
        importlib.import_module("entmaxkv_compile.runtime.ops")  # defines torch.ops.entmaxkv.*
        importlib.import_module("entmaxkv_compile.compiler.markers")  # entmaxkv.entmax_alpha
        _install_entmax_package()
        _install_own()
        _DONE = True
    return tuple(_INSTALLED)
