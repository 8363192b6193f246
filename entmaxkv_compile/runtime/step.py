"""One decode step: select -> decode -> certify, and the certified loop, over any implementation.

The step is written once against a small "implementation" namespace (``select_pages``,
``compact_page_mask``, ``quest_bounds``, ``paged_decode``, ``paged_decode_verdict``, ``certify``,
``certify_pages``, ``certified_heads``, ``certify_policy_update_``), which is either the stage
references (:func:`reference_implementation`) or the Triton kernels (``runtime/kernels.py``). So
the eager API (through ``Decoder``), the ``entmaxkv::decode_step`` op and the tests all run the
same logic, and the kernels only have to match the reference function by function.

Every round is fixed-shape (no data-dependent Python control flow, no host sync), so a compiled
step can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace
from typing import Any, NamedTuple

import torch

from ..config import EntmaxKVConfig
from .attend import reference as attend_reference
from .certify import policy as certify_policy
from .certify import reference as certify_reference
from .select import reference as selection
from .sketch import reference as sketch_reference

__all__ = ["DecodeResult", "implementation_for", "reference_implementation", "run_step"]


@functools.cache
def reference_implementation() -> SimpleNamespace:
    """The pure-torch implementation: each stage's reference core, which trusts its caller (the
    step's entries, ``sparse_decode`` and the ``decode_step`` op, validate once)."""
    return SimpleNamespace(
        select_pages=selection.select_pages_unchecked,
        quest_bounds=selection.quest_bounds_unchecked,
        compact_page_mask=selection.compact_page_mask,
        paged_decode=attend_reference.paged_decode_unchecked,
        paged_decode_verdict=attend_reference.paged_decode_verdict_unchecked,
        certify=certify_reference.certify_unchecked,
        certify_pages=certify_reference.certify_pages,
        certified_heads=certify_reference.certified_heads,
        sketch_page_bounds=sketch_reference.sketch_page_bounds,
        sketch_select=sketch_reference.sketch_select,
        sketch_tau_floor=sketch_reference.sketch_tau_floor,
        sketch_delta_bound=sketch_reference.sketch_delta_bound,
        certify_policy_update_=certify_policy.certify_policy_update_,
    )


class DecodeResult(NamedTuple):
    """One decode step's result (a NamedTuple, so it is a pytree for torch.compile and export).

    ``out [B, Hq, 1, D]`` in q's dtype; ``page_indices [B, Hkv, Npages]``/``num_selected [B, Hkv]``
    int32, the pages attended; ``certified`` bool ``[B, Hq]``, true where ``out`` provably equals
    full entmax; ``delta_bound`` float32 ``[B, Hq]``, an upper bound of the full-entmax mass of the
    unattended tokens; ``tau`` float32 ``[B, Hq]``, the exact threshold of the attended tokens (z units).
    """

    out: torch.Tensor
    page_indices: torch.Tensor
    num_selected: torch.Tensor
    certified: torch.Tensor
    delta_bound: torch.Tensor
    tau: torch.Tensor


def implementation_for(device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """The Triton kernels when they can run on ``device`` for ``dtype`` (fp16/bf16/fp32 on CUDA),
    else the reference (float64 always takes the reference: it is the exactness path)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32):
        try:
            from . import kernels
        except ImportError:  # no usable Triton: the reference is exact, only slower
            return reference_implementation()
        if kernels.available(device):
            return kernels
    return reference_implementation()


def run_step(
    impl: Any | ModuleType,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    config: EntmaxKVConfig,
    *,
    alpha: float,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    stats_valid: torch.Tensor | None = None,
    dense_rows: torch.Tensor | None = None,
    sketch: tuple[torch.Tensor, torch.Tensor] | None = None,
    softcap: float = 0.0,
    row_start: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> DecodeResult:
    """Select pages with ``config.selector``, decode exactly over them and certify.

    ``"certified"`` starts from the gaussian selection S0 with exact threshold tau0, adds every
    unselected page whose bound violates the certificate (``(alpha-1) u_p > tau0`` for some query
    head of the KV head's group) and decodes again over S1. One round always certifies: a page left
    out has ``(alpha-1) u_p <= tau0 <= tau(S1)``, because tau only grows as tokens are added, so no
    left-out token can reach the support and the output equals full entmax. The certificate is
    therefore checked against ``max(tau0, tau1)`` (equal in exact arithmetic; the max removes
    rounding noise). Further rounds (``certify_max_rounds`` > 1) repeat the step and change nothing
    in exact arithmetic. ``stats`` is ``(kmin, kmax, kmean, km2)``; ``stats_valid`` (bool ``[B]``,
    ``KVPageStats.valid_for``) marks sequences whose statistics were not maintained in order: they
    are never certified, and in ``"certified"`` mode they read every page, so their output is
    still full entmax. ``dense_rows`` (bool ``[B]``, certified mode only; see
    ``certify/policy.py``) marks sequences that read every page directly this step, without the
    selection or the bounds: certified wherever tau is finite, as the dense selector.
    ``sketch`` (``KeySketch.buffers()``, when ``config.keeps_sketch``): with ``report_bound``
    the approximate selectors also bound their dropped mass token by token from it. In certified
    mode the selection is the pages whose token-level sketch bound exceeds the sketch's floor of
    the full threshold (the exact threshold of every token's lower sketch bound,
    ``sketch_tau_floor``) instead of the gaussian estimate, and the one decode over them is
    certified by construction (no Quest round).

    ``softcap`` (float, 0 = none): the scores are ``softcap * tanh(s / softcap)`` with
    ``s = scale q.k (+ ALiBi)`` (Gemma-2's logit soft-capping); the exact tau and the output are
    entmax over the capped scores, and every page bound is capped before it meets tau. Certified
    stays exact: the cap is increasing, so an upper bound of s maps to an upper bound of c. The
    key sketch does not take a cap yet: a sketch with ``softcap > 0`` is refused.

    ``row_start`` (int ``[B]``, optional; None = 0): the first attended position of each sequence
    (a left-padded batch hides the prefix ``[0, row_start)``). The result is entmax over
    ``[row_start, seqlens)``: the attend pass masks the rows below the start, and pages lying
    entirely below it are removed from every selection and every certified round, so they are
    never read and need no bound (the selectors neither rank nor count them: top-k fills its
    budget after the start, the gaussian estimate gives them no weight).
    The page that straddles the start keeps its statistics, which cover rows that are not
    attended: its bound is still an upper bound of every attended score (only looser), so the
    certificate stays sound. ``report_bound`` counts the hidden pages in ``delta_bound`` (only
    looser); certified stays exact. A start at or past the length leaves nothing to attend
    (``tau = +inf``, never certified). The key sketch does not take a start: refused.

    ``block_table`` (int32 ``[B, max_pages]``, optional): a paged cache (``runtime/paged.py``):
    ``k_cache``/``v_cache`` are page pools ``[num_blocks, page_size, Hkv, D]`` and ``stats`` are
    per physical block ``[num_blocks, Hkv, D]``; logical page ``p`` of row ``b`` is block
    ``block_table[b, p]``. Selections stay logical; every stage reads through the table. The
    result equals the contiguous step on the cache the table describes. The key sketch does not
    take a table: refused.
    """
    if softcap and sketch is not None:
        raise ValueError(f"softcap={softcap}: the key sketch (config.keeps_sketch) does not bound soft-capped "
                         "scores yet; use a config without the sketch for a soft-capped site")
    if row_start is not None and sketch is not None:
        raise ValueError("row_start: the key sketch (config.keeps_sketch) does not take a per-row first position "
                         "yet; use a config without the sketch for a left-padded batch")
    if block_table is not None and sketch is not None:
        raise ValueError("block_table: the key sketch (config.keeps_sketch) does not read a paged cache yet; "
                         "use a config without the sketch (certify_sketch='off') for a block-table cache")
    kmin, kmax, kmean, km2 = stats
    page_size = config.page_size
    num_pages = kmin.shape[2] if block_table is None else block_table.shape[1]
    # the sketch's stages take no cap (refused above): they get the geometry without it
    sketch_geometry = dict(page_size=page_size, alpha=alpha, scale=scale, alibi_slopes=alibi_slopes)
    paged = {} if block_table is None else {"block_table": block_table}  # only paged steps pass it
    geometry = dict(sketch_geometry, softcap=softcap, **paged)
    first = "gaussian" if config.selector == "certified" else config.selector
    dense_rows = dense_rows if config.selector == "certified" else None
    # a row read densely selects nothing first: length 0 makes the selection load nothing for it
    select_lengths = seqlens if dense_rows is None else torch.where(dense_rows, 0, seqlens)
    if config.selector == "certified":
        stats_ok, read_all = _row_soundness(q, stats_valid, dense_rows)
    sketch_floor = None
    if config.selector == "certified" and sketch is not None:
        page_indices, num_selected, sketch_floor = impl.sketch_select(q, *sketch, seqlens, read_all,
                                                                      **sketch_geometry)
    else:
        page_indices, num_selected = impl.select_pages(
            q, kmin, kmax, kmean, km2, select_lengths, selector=first, token_budget=config.token_budget,
            max_quantile=config.max_quantile, margin=config.margin, tau_estimate=config.tau_estimate,
            sink_pages=config.sink_pages, recent_pages=config.recent_pages,
            min_context=config.min_context, **geometry, row_start=row_start,
        )  # never a page wholly below row_start: the selectors leave them out

    # the decode's own verdict (dense: every valid page read); the branches below replace it
    out, tau, certified, delta = impl.paged_decode_verdict(
        q, k_cache, v_cache, seqlens, page_indices, num_selected, **geometry, row_start=row_start,
        read_all=config.selector == "dense")
    if sketch_floor is not None:
        # Certified by construction: every page left out has (alpha-1) ub <= floor <= full tau.
        certified, delta = impl.certified_heads(torch.maximum(tau, sketch_floor), torch.ones_like(tau, dtype=torch.bool),
                                                seqlens, stats_ok, capacity=num_pages * page_size)
    elif config.selector == "certified":
        out, tau, page_indices, num_selected, certified, delta = _certified_rounds(
            impl, q, k_cache, v_cache, seqlens, stats, config, out, tau, page_indices, num_selected,
            stats_ok, read_all, dense_rows, geometry, row_start, num_pages)
    elif config.report_bound and config.selector != "dense":  # the bound costs a full kmin/kmax read: only on request
        certified, delta = impl.certify(q, kmin, kmax, seqlens, page_indices, num_selected, tau,
                                        stats_valid=stats_valid, **geometry)
        if sketch is not None:  # token by token: 0 only when no dropped token can be in the support
            fine = impl.sketch_delta_bound(q, *sketch, seqlens, page_indices, num_selected, tau,
                                           stats_valid=stats_valid, **sketch_geometry)
            certified = certified | (fine == 0)
            delta = torch.minimum(delta, fine)
    return DecodeResult(out, page_indices, num_selected, certified, delta, tau)


def _row_soundness(q, stats_valid, dense_rows):
    """``(stats_ok, read_all)``, bool ``[B]``: the rows whose statistics were kept in order, and
    the rows that read every page this step (statistics not in order, or the fallback's
    ``dense_rows``)."""
    stats_ok = torch.ones(q.shape[0], dtype=torch.bool, device=q.device) if stats_valid is None else stats_valid
    return stats_ok, (~stats_ok if dense_rows is None else ~stats_ok | dense_rows)


def _certified_rounds(impl, q, k_cache, v_cache, seqlens, stats, config, out, tau, page_indices,
                      num_selected, stats_ok, read_all, dense_rows, geometry, row_start=None, num_pages=None):
    """Add every page whose bound violates the certificate at the current tau, decode again.

    Returns ``(out, tau, page_indices, num_selected, certified, delta_bound)``. After a round, every page left
    out has ``(alpha-1) u_p <= tau_floor <= tau(S1)`` for every head, so the output equals full
    entmax: a head is certified when that argument rests on sound inputs (its bounds finite, its
    tau finite, its length within the cache, its sequence's statistics kept in order). A sequence
    whose statistics are not valid reads every page (its output is still full entmax) and is never
    certified; a ``dense_rows`` sequence reads every page (it selected nothing: its first tau is
    no bound) and rests on no bound. Pages entirely below ``row_start`` are dropped after each
    round (see ``run_step``). ``num_pages``: pages per row (the block table's width when paged).
    """
    kmin, kmax = stats[0], stats[1]
    num_pages = kmin.shape[2] if num_pages is None else num_pages
    tau_floor = tau if dense_rows is None else torch.where(dense_rows[:, None], float("-inf"), tau)
    for _ in range(config.certify_max_rounds):
        chosen = page_indices, num_selected
        page_indices, num_selected, bounds_finite = impl.certify_pages(
            q, kmin, kmax, seqlens, page_indices, num_selected, tau_floor, read_all, **geometry)
        if row_start is not None:
            page_indices, num_selected = selection.drop_pages_below_start(page_indices, num_selected, row_start,
                                                                          config.page_size)
        # The round only adds pages (the selection is kept), so a row whose counts did not grow
        # read exactly what it had read: its decode is not repeated (its kernels get no pages).
        grew = (num_selected != chosen[1]).any(1)
        fresh_out, fresh_tau = impl.paged_decode(q, k_cache, v_cache, seqlens, page_indices,
                                                 torch.where(grew[:, None], num_selected, 0), **geometry,
                                                 row_start=row_start)
        out = torch.where(grew[:, None, None, None], fresh_out, out)
        tau = torch.where(grew[:, None], fresh_tau, tau)
        tau_floor = torch.maximum(tau_floor, tau)
    certified, delta = impl.certified_heads(tau_floor, bounds_finite, seqlens, stats_ok,
                                            capacity=num_pages * config.page_size)
    return out, tau, page_indices, num_selected, certified, delta
