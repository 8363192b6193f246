"""Implementations of every ``entmaxkv`` op as compositions to trace through, keyed by op.

Two tables with the ops' own signatures: the pure-torch references
(:func:`reference_implementations`) and the compositions of our Triton kernels
(:func:`kernel_implementations`, for engines that compile Triton, such as AOTInductor on CUDA).
Exports that must run on standard ops only (ONNX for onnxruntime, any backend without our
kernels) substitute these for the custom ops *before* ``torch.export`` traces the graph, so the
traced program holds nothing but aten ops. They call the same reference modules as the ops' CPU
implementations (the math and each stage's ``reference``), so a decomposed program
computes exactly what the custom ops compute on CPU. In-place references (the page-statistics
updates) are fine: ``torch.export`` functionalizes them into state outputs.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..math import reference
from ..runtime import step
from ..runtime.attend import reference as attend_reference
from ..runtime.certify import reference as certify_stage
from ..runtime import ops as _ops  # noqa: F401  (registers torch.ops.entmaxkv.*)
from ..config import EntmaxKVConfig
from ..runtime.select import reference as selection
from ..runtime.stats import reference as cache
from ..runtime.stats import rolling

__all__ = [
    "STANDARD_OP_DECOMPOSITIONS", "bool_cumprod", "erf_rational", "erfc_rational", "kernel_implementations",
    "ndtri_rational", "prod_over_dims", "reference_implementations", "substitute_kernels", "substitute_references",
]

DecodeOutputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def entmax_reference(x: Tensor, alpha: float, dim: int) -> Tensor:
    """``entmaxkv::entmax``: exact alpha-entmax along ``dim``, in ``x``'s dtype."""
    return reference.entmax_probs(x, alpha, dim).to(x.dtype)


def _op_table(stages: Any, step_impl: Any) -> dict[Any, Callable[..., Any]]:
    """``{op: function with the op's signature}`` computing every ``entmaxkv`` op with ``stages``
    (``select_pages``, ``paged_decode``, ``certify``, ``stats_append_``, ``stats_prefill_``,
    ``stats_rebuild_page_``, as the stage modules name them) and the whole step with ``run_step(step_impl, ...)``."""

    # Plain functions (an fx node's target must have a name; a kernel may be a triton_op object).
    def stats_append_(k_cache: Tensor, positions: Tensor, page_size: int, kmin: Tensor, kmax: Tensor,
                      kmean: Tensor, km2: Tensor) -> None:
        stages.stats_append_(k_cache, positions, page_size, kmin, kmax, kmean, km2)

    def stats_prefill_(k_cache: Tensor, seqlens: Tensor, page_size: int, kmin: Tensor, kmax: Tensor,
                       kmean: Tensor, km2: Tensor) -> None:
        stages.stats_prefill_(k_cache, seqlens, page_size, kmin, kmax, kmean, km2)

    def stats_rebuild_page_(k_cache: Tensor, slots: Tensor, seqlens: Tensor, page_size: int, kmin: Tensor,
                            kmax: Tensor, kmean: Tensor, km2: Tensor) -> None:
        stages.stats_rebuild_page_(k_cache, slots, seqlens, page_size, kmin, kmax, kmean, km2)

    def select_pages(q: Tensor, kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor, seqlens: Tensor,
                     alibi_slopes: Optional[Tensor], scale: float, alpha: float, page_size: int, selector: str,
                     token_budget: int, max_quantile: float, margin: float, tau_estimate: str, sink_pages: int,
                     recent_pages: int, min_context: int) -> tuple[Tensor, Tensor]:
        return stages.select_pages(
            q, kmin, kmax, kmean, km2, seqlens, page_size=page_size, alpha=alpha, scale=scale,
            selector=selector, token_budget=token_budget, max_quantile=max_quantile, margin=margin,
            tau_estimate=tau_estimate, sink_pages=sink_pages, recent_pages=recent_pages,
            min_context=min_context, alibi_slopes=alibi_slopes,
        )

    def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, page_indices: Tensor,
                     num_selected: Tensor, alibi_slopes: Optional[Tensor], scale: float, alpha: float,
                     page_size: int) -> tuple[Tensor, Tensor]:
        return stages.paged_decode(q, k_cache, v_cache, seqlens, page_indices, num_selected,
                                   page_size=page_size, alpha=alpha, scale=scale, alibi_slopes=alibi_slopes)

    def certify(q: Tensor, kmin: Tensor, kmax: Tensor, seqlens: Tensor, page_indices: Tensor,
                num_selected: Tensor, tau: Tensor, alibi_slopes: Optional[Tensor], scale: float, alpha: float,
                page_size: int) -> tuple[Tensor, Tensor]:
        return stages.certify(q, kmin, kmax, seqlens, page_indices, num_selected, tau,
                              page_size=page_size, alpha=alpha, scale=scale, alibi_slopes=alibi_slopes)

    def decode_step(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, kmin: Tensor, kmax: Tensor,
                    kmean: Tensor, km2: Tensor, alibi_slopes: Optional[Tensor], scale: float, alpha: float,
                    page_size: int, selector: str, token_budget: int, max_quantile: float, margin: float,
                    tau_estimate: str, sink_pages: int, recent_pages: int, certify_max_rounds: int,
                    min_context: int, stats_valid: Optional[Tensor] = None, dense_rows: Optional[Tensor] = None,
                    softcap: float = 0.0, row_start: Optional[Tensor] = None) -> DecodeOutputs:
        config = EntmaxKVConfig(
            selector=selector, page_size=page_size, token_budget=token_budget, max_quantile=max_quantile,
            margin=margin, tau_estimate=tau_estimate, sink_pages=sink_pages, recent_pages=recent_pages,
            certify_max_rounds=certify_max_rounds, min_context=min_context,
        )
        result = step.run_step(step_impl, q, k_cache, v_cache, seqlens, (kmin, kmax, kmean, km2), config,
                               alpha=alpha, scale=scale, alibi_slopes=alibi_slopes, stats_valid=stats_valid,
                               dense_rows=dense_rows, softcap=softcap, row_start=row_start)
        return result.out, result.page_indices, result.num_selected, result.certified, result.delta_bound

    ops = torch.ops.entmaxkv
    return {
        ops.entmax.default: entmax_reference,  # prefill-side entmax: no kernel of ours
        ops.page_stats_append.default: stats_append_,
        ops.page_stats_prefill.default: stats_prefill_,
        ops.page_stats_rebuild.default: stats_rebuild_page_,
        ops.select_pages.default: select_pages,
        ops.paged_decode.default: paged_decode,
        ops.certify.default: certify,
        ops.decode_step.default: decode_step,
    }


# Acklam's rational approximation of the standard normal quantile (relative error < 1.2e-9).
_ACKLAM_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
             -3.066479806614716e01, 2.506628277459239e00)
_ACKLAM_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
             -1.328068155288572e01, 1.0)
_ACKLAM_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
             4.374664141464968e00, 2.938163982698783e00)
_ACKLAM_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00, 1.0)
_ACKLAM_SPLIT = 0.02425


def _horner(coefficients: tuple[float, ...], x: Tensor) -> Tensor:
    result = torch.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        result = result * x + c
    return result


def ndtri_rational(p: Tensor) -> Tensor:
    """The standard normal quantile Phi^-1(p) from standard ops (ONNX has no erfinv / ndtri).

    Acklam's piecewise rational approximation evaluated in float64, relative error below 1.2e-9
    (beyond float32's resolution); exact +-inf at p = 1 and p = 0, NaN outside [0, 1].
    """
    x = p.to(torch.float64)  # the central branch cancels: float32 arithmetic would lose ~1e-5
    tail = torch.minimum(x, 1.0 - x)
    r = torch.sqrt(-2.0 * torch.log(torch.where(tail > 0.0, tail, 1.0)))
    tail_value = _horner(_ACKLAM_C, r) / _horner(_ACKLAM_D, r)
    tail_value = torch.where(x > 0.5, -tail_value, tail_value)
    centred = x - 0.5
    squared = centred * centred
    central_value = centred * _horner(_ACKLAM_A, squared) / _horner(_ACKLAM_B, squared)
    value = torch.where((x >= _ACKLAM_SPLIT) & (x <= 1.0 - _ACKLAM_SPLIT), central_value, tail_value)
    value = torch.where(x == 0.0, float("-inf"), torch.where(x == 1.0, float("inf"), value))
    value = torch.where((x < 0.0) | (x > 1.0) | torch.isnan(x), float("nan"), value)
    return value.to(p.dtype)


# Chebyshev-fitted erfc (Numerical Recipes' erfcc): relative error below 1.2e-7 everywhere, tails included.
_ERFC = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196,
         1.00002368, -1.26551223)


def erfc_rational(x: Tensor) -> Tensor:
    """erfc from standard ops (onnxruntime's CPU ``Erf`` has no float64 kernel).

    Relative error below 1.2e-7 for every x, so the Gaussian tail probabilities the selector sums
    keep their relative accuracy (``1 - erf`` would round them to 0).
    """
    z = x.abs()
    t = 1.0 / (1.0 + 0.5 * z)
    tail = t * torch.exp(-z * z + _horner(_ERFC, t))
    return torch.where(x >= 0, tail, 2.0 - tail)


def erf_rational(x: Tensor) -> Tensor:
    """erf as ``1 - erfc_rational`` (absolute error below 1.2e-7)."""
    return 1.0 - erfc_rational(x)


def prod_over_dims(x: Tensor, dims: Optional[list[int]], output_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``prims.prod`` (no ONNX translation) as ``aten.prod`` over one dim at a time (``ReduceProd``)."""
    out = x
    for dim in sorted(range(x.dim()) if dims is None else dims, reverse=True):
        out = torch.prod(out, dim)
    return out if output_dtype is None else out.to(output_dtype)


def bool_cumprod(x: Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``cumprod`` of a bool tensor (ONNX has no CumProd): 1 while no False has been seen."""
    seen_false = torch.cumsum(torch.logical_not(x).to(torch.int64), dim)
    return (seen_false == 0).to(torch.int64 if dtype is None else dtype)


#: Decompositions of aten/prims ops that ONNX lacks, used when exporting standard ops only.
STANDARD_OP_DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    torch.ops.aten.special_ndtri.default: ndtri_rational,
    torch.ops.prims.ndtri.default: ndtri_rational,
}


def reference_implementations() -> dict[Any, Callable[..., Any]]:
    """``{torch.ops.entmaxkv.<op>.default: pure-torch function with the op's signature}``."""
    stages = SimpleNamespace(select_pages=selection.select_pages, paged_decode=attend_reference.paged_decode,
                             certify=certify_stage.certify, stats_append_=cache.stats_append_,
                             stats_prefill_=cache.stats_prefill_, stats_rebuild_page_=rolling.stats_rebuild_page_)
    return _op_table(stages, step.reference_implementation())


def kernel_implementations() -> dict[Any, Callable[..., Any]]:
    """``{torch.ops.entmaxkv.<op>.default: function with the op's signature}`` built on our Triton
    kernels (``runtime/kernels.py``, each a ``triton_op``): traced by ``torch.export``, the
    program calls ``entmaxkv::triton_*`` ops, which Inductor lowers to the kernels themselves
    (AOTInductor compiles them into its package). Needs a device the kernels run on."""
    from ..runtime import kernels

    return _op_table(kernels, kernels)


def _substitute(gm: torch.fx.GraphModule, table: dict[Any, Callable[..., Any]], keep: frozenset) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in table and node.target not in keep:
            node.target = table[node.target]
            count += 1
    if count:
        gm.recompile()
    return count


def substitute_references(gm: torch.fx.GraphModule, keep: frozenset = frozenset()) -> int:
    """Point every ``entmaxkv`` op call in ``gm`` (except those in ``keep``) at its reference.

    Tracing ``gm`` again (``torch.export``) then records the reference's aten ops instead of the
    custom op. Returns the number of calls substituted.
    """
    return _substitute(gm, reference_implementations(), keep)


def substitute_kernels(gm: torch.fx.GraphModule) -> int:
    """Point every ``entmaxkv`` op call in ``gm`` at its composition of our Triton kernels
    (:func:`kernel_implementations`); tracing ``gm`` again records the ``entmaxkv::triton_*``
    ops. Returns the number of calls substituted."""
    return _substitute(gm, kernel_implementations(), frozenset())
