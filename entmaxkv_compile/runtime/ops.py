"""The ``torch.library`` ops of namespace ``entmaxkv``: schema, fake (meta) implementation, dispatch.

These ops are what the graph passes insert and what export sees. Each one has:

- a schema inferred from the Python signature (mutated stat buffers are declared in
  ``mutates_args``, so functionalization, CUDA graphs and export see the truth);
- a fake implementation giving output shapes/dtypes without computing (for tracing);
- an eager implementation that runs the Triton kernels on CUDA when they are usable and the pure
  torch reference of each stage (``runtime/<stage>/reference.py``) everywhere else.

All ops are fixed-shape and sync-free, so a decode step built from them can be captured in a CUDA
graph. The value checks of the public API (NaN, lengths beyond capacity) are not repeated here.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ..checks import check_row_start, check_softcap, check_step_inputs
from ..config import EntmaxKVConfig
from ..math import reference
from . import step
from .paged import check_paged_bound_inputs, check_paged_decode_inputs
from .attend import reference as attend_reference
from .certify import reference as certify_reference
from .select import reference as selection
from .stats import reference as cache
from .stats import rolling
from .stats.paged import paged_stats_impl

__all__ = [
    "entmax",
    "page_stats_prefill",
    "page_stats_append",
    "page_stats_rebuild",
    "page_stats_track_rolling",
    "paged_stats_prefill",
    "paged_stats_append",
    "select_pages",
    "paged_decode",
    "certify",
    "decode_step",
    "certify_policy_update",
]


def _kernels_for(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The Triton kernel module when it can run on ``device``/``dtype``, else ``None`` (reference)."""
    impl = step.implementation_for(device, dtype)
    return None if impl is step.reference_implementation() else impl


# --------------------------------------------------------------------------------------------- entmax


@torch.library.custom_op("entmaxkv::entmax", mutates_args=())
def entmax(x: Tensor, alpha: float, dim: int) -> Tensor:
    """alpha-entmax of ``x`` along ``dim``; also the marker the capture pass emits for entmax calls."""
    return reference.entmax_probs(x, alpha, dim).to(x.dtype)


@entmax.register_fake
def _(x: Tensor, alpha: float, dim: int) -> Tensor:
    return torch.empty_like(x)


def _entmax_setup_context(ctx, inputs, output) -> None:
    _, alpha, dim = inputs
    ctx.save_for_backward(output)
    ctx.alpha, ctx.dim = alpha, dim


def _entmax_backward(ctx, grad: Tensor):
    (p,) = ctx.saved_tensors
    p32 = p.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
    u = torch.where(p32 > 0, p32.pow(2.0 - ctx.alpha), 0.0)
    g = grad.to(p32.dtype)
    coef = (u * g).sum(ctx.dim, keepdim=True) / u.sum(ctx.dim, keepdim=True).clamp(min=1e-30)
    return (u * g - coef * u).to(p.dtype), None, None


entmax.register_autograd(_entmax_backward, setup_context=_entmax_setup_context)


# ------------------------------------------------------------------------------------- page statistics


@torch.library.custom_op("entmaxkv::page_stats_prefill", mutates_args=("kmin", "kmax", "kmean", "km2"))
def page_stats_prefill(
    k_cache: Tensor, seqlens: Tensor, page_size: int, kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor
) -> None:
    """Recompute every page's statistics from the first ``seqlens[b]`` rows of ``k_cache``."""
    impl = _kernels_for(k_cache.device, k_cache.dtype) or cache
    impl.stats_prefill_(k_cache, seqlens, page_size, kmin, kmax, kmean, km2)


@page_stats_prefill.register_fake
def _(k_cache, seqlens, page_size, kmin, kmax, kmean, km2) -> None:
    return None


@torch.library.custom_op("entmaxkv::page_stats_append", mutates_args=("kmin", "kmax", "kmean", "km2"))
def page_stats_append(
    k_cache: Tensor, positions: Tensor, page_size: int, kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor
) -> None:
    """Fold the rows just written at ``positions[b]`` into their pages' statistics (O(D) each)."""
    impl = _kernels_for(k_cache.device, k_cache.dtype) or cache
    impl.stats_append_(k_cache, positions, page_size, kmin, kmax, kmean, km2)


@page_stats_append.register_fake
def _(k_cache, positions, page_size, kmin, kmax, kmean, km2) -> None:
    return None


@torch.library.custom_op("entmaxkv::page_stats_rebuild", mutates_args=("kmin", "kmax", "kmean", "km2"))
def page_stats_rebuild(
    k_cache: Tensor, slots: Tensor, seqlens: Tensor, page_size: int, kmin: Tensor, kmax: Tensor, kmean: Tensor,
    km2: Tensor,
) -> None:
    """Recompute the page holding row ``slots[b]`` from its cache rows below ``seqlens[b]`` (a
    rolling buffer's written page, ``runtime/stats/rolling.py``; O(P*D) each)."""
    impl = _kernels_for(k_cache.device, k_cache.dtype) or rolling
    impl.stats_rebuild_page_(k_cache, slots, seqlens, page_size, kmin, kmax, kmean, km2)


@page_stats_rebuild.register_fake
def _(k_cache, slots, seqlens, page_size, kmin, kmax, kmean, km2) -> None:
    return None


@torch.library.custom_op("entmaxkv::paged_stats_prefill", mutates_args=("kmin", "kmax", "kmean", "km2"))
def paged_stats_prefill(
    k_pool: Tensor, block_table: Tensor, seqlens: Tensor, page_size: int, kmin: Tensor, kmax: Tensor, kmean: Tensor,
    km2: Tensor,
) -> None:
    """Recompute the per-block statistics ``[num_blocks, Hkv, D]`` of each row's first
    ``seqlens[b]`` tokens, read from ``k_pool`` through ``block_table`` (``runtime/paged.py``)."""
    paged_stats_impl(k_pool)(k_pool, block_table, seqlens, page_size, kmin, kmax, kmean, km2)


@paged_stats_prefill.register_fake
def _(k_pool, block_table, seqlens, page_size, kmin, kmax, kmean, km2) -> None:
    return None


@torch.library.custom_op("entmaxkv::paged_stats_append", mutates_args=("kmin", "kmax", "kmean", "km2"))
def paged_stats_append(
    k_pool: Tensor, block_table: Tensor, positions: Tensor, page_size: int, kmin: Tensor, kmax: Tensor,
    kmean: Tensor, km2: Tensor,
) -> None:
    """Fold the row each sequence just wrote at ``positions[b]`` (block ``block_table[b, pos // P]``,
    row ``pos % P``) into that block's statistics (O(D) each)."""
    paged_stats_impl(k_pool, append=True)(k_pool, block_table, positions, page_size, kmin, kmax, kmean, km2)


@paged_stats_append.register_fake
def _(k_pool, block_table, positions, page_size, kmin, kmax, kmean, km2) -> None:
    return None


@torch.library.custom_op("entmaxkv::page_stats_track", mutates_args=("last_position", "valid"))
def page_stats_track(
    positions: Tensor, page_size: int, max_seqlen: int, last_position: Tensor, valid: Tensor
) -> None:
    """Record an append at ``positions`` in the statistics' order state: ``valid`` drops to False
    (until the next prefill) for a sequence whose append did not continue it (no sync)."""
    cache.stats_track_(positions, page_size, max_seqlen, last_position, valid)


@page_stats_track.register_fake
def _(positions, page_size, max_seqlen, last_position, valid) -> None:
    return None


@torch.library.custom_op("entmaxkv::page_stats_track_rolling", mutates_args=("last_position", "valid"))
def page_stats_track_rolling(positions: Tensor, last_position: Tensor, valid: Tensor) -> None:
    """Record a rolling-buffer write at ``positions`` (positions, not slots) in the order state:
    ``valid`` drops to False (until the next prefill) where a position was skipped (no sync)."""
    rolling.stats_track_rolling_(positions, last_position, valid)


@page_stats_track_rolling.register_fake
def _(positions, last_position, valid) -> None:
    return None


@torch.library.custom_op("entmaxkv::page_stats_mark_prefilled", mutates_args=("last_position", "valid"))
def page_stats_mark_prefilled(seqlens: Tensor, max_seqlen: int, last_position: Tensor, valid: Tensor) -> None:
    """The order state after a prefill of ``seqlens`` rows (last position ``L - 1``, valid)."""
    cache.stats_state_after_prefill_(seqlens, max_seqlen, last_position, valid)


@page_stats_mark_prefilled.register_fake
def _(seqlens, max_seqlen, last_position, valid) -> None:
    return None


# ------------------------------------------------------------------------------------------ selection


@torch.library.custom_op("entmaxkv::select_pages", mutates_args=())
def select_pages(
    q: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    kmean: Tensor,
    km2: Tensor,
    seqlens: Tensor,
    alibi_slopes: Optional[Tensor],
    scale: float,
    alpha: float,
    page_size: int,
    selector: str,
    token_budget: int,
    max_quantile: float,
    margin: float,
    tau_estimate: str,
    sink_pages: int,
    recent_pages: int,
    min_context: int,
) -> tuple[Tensor, Tensor]:
    """Choose pages per KV head: ``(page_indices [B,Hkv,Npages] int32, num_selected [B,Hkv] int32)``."""
    impl = _kernels_for(q.device, q.dtype) or selection
    return impl.select_pages(
        q, kmin, kmax, kmean, km2, seqlens,
        page_size=page_size, alpha=alpha, scale=scale, selector=selector, token_budget=token_budget,
        max_quantile=max_quantile, margin=margin, tau_estimate=tau_estimate, sink_pages=sink_pages,
        recent_pages=recent_pages, min_context=min_context, alibi_slopes=alibi_slopes,
    )


@select_pages.register_fake
def _(q, kmin, kmax, kmean, km2, seqlens, alibi_slopes, scale, alpha, page_size, selector, *rest):
    batch, kv_heads, num_pages, _ = kmin.shape
    return (
        q.new_empty((batch, kv_heads, num_pages), dtype=torch.int32),
        q.new_empty((batch, kv_heads), dtype=torch.int32),
    )


# --------------------------------------------------------------------------------------------- decode


@torch.library.custom_op("entmaxkv::paged_decode", mutates_args=())
def paged_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    page_indices: Tensor,
    num_selected: Tensor,
    alibi_slopes: Optional[Tensor],
    scale: float,
    alpha: float,
    page_size: int,
) -> tuple[Tensor, Tensor]:
    """Exact entmax attention over the selected pages: ``(out [B,Hq,1,D], tau [B,Hq] f32)``."""
    impl = _kernels_for(q.device, q.dtype) or attend_reference
    return impl.paged_decode(
        q, k_cache, v_cache, seqlens, page_indices, num_selected,
        page_size=page_size, alpha=alpha, scale=scale, alibi_slopes=alibi_slopes,
    )


@paged_decode.register_fake
def _(q, k_cache, v_cache, seqlens, page_indices, num_selected, alibi_slopes, scale, alpha, page_size):
    batch, q_heads = q.shape[:2]
    return torch.empty_like(q), q.new_empty((batch, q_heads), dtype=torch.float32)


@torch.library.custom_op("entmaxkv::certify", mutates_args=())
def certify(
    q: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    seqlens: Tensor,
    page_indices: Tensor,
    num_selected: Tensor,
    tau: Tensor,
    alibi_slopes: Optional[Tensor],
    scale: float,
    alpha: float,
    page_size: int,
) -> tuple[Tensor, Tensor]:
    """The support certificate: ``(certified [B,Hq] bool, delta_bound [B,Hq] f32)``."""
    impl = _kernels_for(q.device, q.dtype) or certify_reference
    return impl.certify(
        q, kmin, kmax, seqlens, page_indices, num_selected, tau,
        page_size=page_size, alpha=alpha, scale=scale, alibi_slopes=alibi_slopes,
    )


@certify.register_fake
def _(q, kmin, kmax, seqlens, page_indices, num_selected, tau, alibi_slopes, scale, alpha, page_size):
    batch, q_heads = q.shape[:2]
    return (
        q.new_empty((batch, q_heads), dtype=torch.bool),
        q.new_empty((batch, q_heads), dtype=torch.float32),
    )


# ---------------------------------------------------------------------------------- the whole step


@torch.library.custom_op("entmaxkv::decode_step", mutates_args=())
def decode_step(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    kmean: Tensor,
    km2: Tensor,
    alibi_slopes: Optional[Tensor],
    scale: float,
    alpha: float,
    page_size: int,
    selector: str,
    token_budget: int,
    max_quantile: float,
    margin: float,
    tau_estimate: str,
    sink_pages: int,
    recent_pages: int,
    certify_max_rounds: int,
    min_context: int,
    stats_valid: Optional[Tensor] = None,
    dense_rows: Optional[Tensor] = None,
    softcap: float = 0.0,
    row_start: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Select, decode and certify one step (the op the graph rewrite inserts).

    Returns ``(out [B,Hq,1,D], page_indices [B,Hkv,Npages], num_selected [B,Hkv],
    certified [B,Hq], delta_bound [B,Hq])``; see :func:`entmaxkv_compile.runtime.step.run_step`.
    ``stats_valid`` (bool ``[B]``, optional): the statistics were kept in order for that sequence.
    ``dense_rows`` (bool ``[B]``, optional, certified mode): sequences that read every page
    directly this step (``runtime/certify/policy.py``).
    ``softcap`` (last, default 0.0 = none, so calls written before it still bind): entmax over
    ``softcap * tanh(s / softcap)`` (Gemma-2's logit soft-capping).
    ``row_start`` (last, optional int ``[B]``): each sequence attends ``[row_start, seqlens)``
    only (a left-padded batch: the rewrite computes it from the padding mask).
    ``block_table`` (last, optional int32 ``[B, max_pages]``): the caches are page pools and the
    statistics per block (``runtime/paged.py``); the backend inserts it for a model whose cache is
    a page pool read through a block table input (``compiler/passes/match_paged.py``).
    """
    config = _config(page_size, selector, token_budget, max_quantile, margin, tau_estimate,
                     sink_pages, recent_pages, certify_max_rounds, min_context)
    if block_table is None:
        check_step_inputs(q, k_cache, v_cache, seqlens, (kmin, kmax, kmean, km2), page_size=page_size, alpha=alpha,
                          scale=scale, alibi_slopes=alibi_slopes)
    else:
        check_paged_decode_inputs(q, k_cache, v_cache, seqlens, block_table, page_size=page_size)
        check_paged_bound_inputs(q, block_table, kmin, kmax, kmean, km2)
    check_row_start(row_start, q.shape[0], device=q.device)
    result = step.run_step(
        step.implementation_for(q.device, q.dtype), q, k_cache, v_cache, seqlens, (kmin, kmax, kmean, km2),
        config, alpha=alpha, scale=scale, alibi_slopes=alibi_slopes, stats_valid=stats_valid,
        dense_rows=dense_rows, softcap=check_softcap(softcap), row_start=row_start, block_table=block_table,
    )
    return tuple(result[:5])


# decode_step's block_table among the arguments after km2 (the fake's ``rest``)
_BLOCK_TABLE_AT = [arg.name for arg in decode_step._opoverload._schema.arguments].index("block_table") - 8


@decode_step.register_fake
def _(q, k_cache, v_cache, seqlens, kmin, kmax, kmean, km2, *rest, **kwargs):
    table = rest[_BLOCK_TABLE_AT] if len(rest) > _BLOCK_TABLE_AT else kwargs.get("block_table")
    return decode_step_outputs_like(q, kmin, None if table is None else table.shape[1])


@torch.library.custom_op("entmaxkv::certify_policy_update", mutates_args=("certify_skip",))
def certify_policy_update(
    certify_skip: Tensor, dense_rows: Tensor, num_selected: Tensor, seqlens: Tensor, page_size: int,
    num_pages: int, dense_above: float, probe_every: int,
) -> None:
    """Advance the certified mode's read-everything counter after a step (``certify/policy.py``)."""
    step.implementation_for(certify_skip.device).certify_policy_update_(certify_skip, dense_rows, num_selected, seqlens, page_size=page_size,
                                  num_pages=num_pages, dense_above=dense_above, probe_every=probe_every)


@certify_policy_update.register_fake
def _(certify_skip, dense_rows, num_selected, seqlens, page_size, num_pages, dense_above, probe_every) -> None:
    return None


def decode_step_outputs_like(q: Tensor, kmin: Tensor,
                             num_pages: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Empty tensors shaped like ``decode_step``'s outputs (its fake implementation, shared with
    the export-only twin ``decode_step_plugin``); ``num_pages``: the block table's width, for
    per-block statistics."""
    batch, q_heads = q.shape[:2]
    kv_heads = kmin.shape[1]
    num_pages = kmin.shape[2] if num_pages is None else num_pages
    return (
        torch.empty_like(q),
        q.new_empty((batch, kv_heads, num_pages), dtype=torch.int32),
        q.new_empty((batch, kv_heads), dtype=torch.int32),
        q.new_empty((batch, q_heads), dtype=torch.bool),
        q.new_empty((batch, q_heads), dtype=torch.float32),
    )


@functools.lru_cache(maxsize=64)
def _config(*fields) -> EntmaxKVConfig:
    """The validated config of a decode_step call (cached: the step runs every token)."""
    names = ("page_size", "selector", "token_budget", "max_quantile", "margin", "tau_estimate",
             "sink_pages", "recent_pages", "certify_max_rounds", "min_context")
    return EntmaxKVConfig(**dict(zip(names, fields)))

