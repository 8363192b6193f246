"""The marker op of an entmax whose alpha is a tensor (a per-head, possibly learned, alpha).

``entmax.entmax_bisect(x, alpha=tensor)`` cannot become the scalar marker ``entmaxkv.entmax``, and
traced as is it splits the model's graph (Dynamo breaks the graph at the package's autograd
``Function``), so no attention site would even be reported. While tracing, the capture polyfill
(``capture.py``) emits ``entmaxkv.entmax_alpha(x, alpha, dim, n_iter, ensure_sum_one)`` instead.
Run, it calls the package's own ``entmax_bisect`` with the same arguments (so a site the passes
refuse computes exactly what the model computes), and its gradient is the package's.

The passes report the site as entmax attention and rewrite it only when every head's alpha is
provably one constant (``passes/alpha.py``); ``decode_step`` takes one alpha.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor


def _entmax_package():
    try:
        from entmax import root_finding
    except ImportError as error:  # only emitted by the polyfill, which exists only with the package
        raise RuntimeError("entmaxkv.entmax_alpha needs the PyPI package 'entmax' (pip install entmax)") from error
    return root_finding


@torch.library.custom_op("entmaxkv::entmax_alpha", mutates_args=())
def entmax_alpha(x: Tensor, alpha: Tensor, dim: int, n_iter: int, ensure_sum_one: bool) -> Tensor:
    """``entmax.entmax_bisect(x, alpha, dim, n_iter, ensure_sum_one)`` with a tensor ``alpha``."""
    return _entmax_package().entmax_bisect(x, alpha, dim, n_iter, ensure_sum_one)


@entmax_alpha.register_fake
def _(x: Tensor, alpha: Tensor, dim: int, n_iter: int, ensure_sum_one: bool) -> Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, alpha, dim, _, _ = inputs
    shape = list(x.shape)
    shape[dim] = 1
    ctx.save_for_backward(output, alpha)
    ctx.dim, ctx.expanded = dim, shape


def _backward(ctx, grad: Tensor):
    """The package's ``EntmaxBisectFunction.backward``, given the context it expects."""
    output, alpha = ctx.saved_tensors
    like = SimpleNamespace(saved_tensors=(output,), alpha=alpha.expand(*ctx.expanded), dim=ctx.dim,
                           needs_input_grad=(True, ctx.needs_input_grad[1], False, False, False))
    d_x, d_alpha, *_ = _entmax_package().EntmaxBisectFunction.backward(like, grad)
    if d_alpha is not None:
        d_alpha = d_alpha.sum_to_size(alpha.shape)
    return d_x, d_alpha, None, None, None


entmax_alpha.register_autograd(_backward, setup_context=_setup_context)
