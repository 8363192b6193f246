"""Page scoring and selection on device: ops ``entmaxkv::triton_quest_bounds`` and
``entmaxkv::triton_select_pages``; same arguments and results as the reference ``select/reference.py``.

Bytes per step and KV head: the gaussian selector reads kmean + km2 (2 x 4 x D bytes per page,
or 2 x 2 x D with compact fp16/bf16 moments),
top-k reads kmin + kmax (2 x 2 x D for fp16), dense reads no statistics. Intermediate page
scores are 4 bytes per page and query head. Outputs have fixed capacity; nothing syncs.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ...checks import check_kernel_bound_inputs, check_row_start, check_softcap
from ...config import SELECTORS, TAU_ESTIMATES
from .. import _common as cm
from ..paged import check_paged_bound_inputs, gather_stats, logical_pages, pool_stats_strides, table_args
from ..tuning.tuned import lookup
from .reference import (
    forced_page_mask,
    head_normalized_group_score,
    pages_from_start,
    top_pages_lowest_id_ties,
    valid_page_mask,
)
from .select_kernels import compact_kernel, dense_pages_kernel, keep_kernel, moments_kernel, quest_kernel
from .tau_hat import MAX_ITERS, mixture_tau_kernel, tail_constants

PAGE_SELECTORS = tuple(s for s in SELECTORS if s != "certified")


def _stats_view(q: Tensor, kmin: Tensor, block_table: Optional[Tensor] = None) -> tuple[int, int, int, int, int]:
    """``(B, Hq, Hkv, pages per row, D)``; statistics are ``[B, Hkv, Np, D]``, or per block
    ``[num_blocks, Hkv, D]`` with a table (``runtime/paged.py``)."""
    batch, hq, _, dim = q.shape
    return batch, hq, kmin.shape[1], logical_pages(kmin, block_table), dim


def launch_quest(q: Tensor, kmin: Tensor, kmax: Tensor, seqlens: Tensor, page_size: int,
                 scale: float, alibi_slopes: Optional[Tensor], *, per_head: bool,
                 group_max: bool, softcap: float = 0.0,
                 block_table: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Quest bounds per query head ``[B, Hq, Np]`` and/or their group max ``[B, Hkv, Np]``
    (soft-capped when ``softcap > 0``; per-block statistics read through ``block_table``)."""
    batch, hq, hkv, num_pages, dim = _stats_view(q, kmin, block_table)
    cfg = lookup("select", q.device, "default", num_pages * page_size)
    bounds = torch.empty((batch, hq, num_pages), device=q.device, dtype=torch.float32) \
        if per_head else None
    group = torch.empty((batch, hkv, num_pages), device=q.device, dtype=torch.float32) \
        if group_max else None
    dummy = seqlens
    wrap_triton(quest_kernel)[(cm.cdiv(num_pages, cfg["BLOCK_P"]), batch * hkv)](
        q, kmin, kmax, seqlens, alibi_slopes if alibi_slopes is not None else q,
        bounds if per_head else dummy, group if group_max else dummy,
        q.stride(0), q.stride(1), q.stride(3), *pool_stats_strides(kmin, block_table),
        hq, hkv, hq // hkv, dim, num_pages, page_size, scale, softcap if softcap else 1.0,
        *table_args(block_table, seqlens),
        HAS_ALIBI=alibi_slopes is not None, SOFTCAP=bool(softcap), WRITE_HEADS=per_head, WRITE_GROUP=group_max,
        BLOCK_G=max(16, cm.next_pow2(hq // hkv)), BLOCK_P=cfg["BLOCK_P"],
        BLOCK_D=max(16, cm.next_pow2(dim)), DOT_PREC=cm.dot_precision(q.device, q.dtype),
        UPCAST=cm.dot_upcast(q.device, q.dtype), num_warps=cfg["num_warps"],
    )
    return bounds, group


def _page_moments(q: Tensor, kmean: Tensor, km2: Tensor, seqlens: Tensor, page_size: int,
                  alpha: float, scale: float, mixture: bool, beta: int,
                  alibi_slopes: Optional[Tensor], row_start: Optional[Tensor] = None,
                  block_table: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Page moments (mu, sigma) ``[B, Hq, Np]``, the moments kernel's per-program sums ``[B, Hq,
    programs, 2]`` (float64) from which the keep kernel solves the single-Gaussian tau_hat, and
    with ``mixture`` the mixture's tau_hat ``[B, Hq]`` (else None); all on device (the pages
    wholly below ``row_start`` count as empty)."""
    has_start = row_start is not None
    start = row_start if has_start else seqlens  # never read when has_start is False
    batch, hq, hkv, num_pages, dim = _stats_view(q, kmean, block_table)
    cfg = lookup("select", q.device, "default", num_pages * page_size)
    per_prog = cfg["MOMENTS_BLOCKS"]
    nblocks = cm.cdiv(num_pages, cfg["BLOCK_PM"] * per_prog)  # programs along the pages
    dev = q.device
    mu = torch.empty((batch, hq, num_pages), device=dev, dtype=torch.float32)
    sigma = torch.empty_like(mu)
    mom = torch.empty((batch, hq, nblocks, 2), device=dev, dtype=torch.float64)
    dot_mode = int(cfg["MOMENTS_DOT"])
    if dot_mode not in (0, 1, 2):
        raise ValueError(f"MOMENTS_DOT must be 0 (FMA), 1 (tf32x3 dots) or 2 (one-pass dots), got {dot_mode}")
    # The dot forms pad the G heads to 16 rows; the FMA form loops over next_pow2(G) heads.
    block_g = max(16, cm.next_pow2(hq // hkv)) if dot_mode else cm.next_pow2(hq // hkv)
    wrap_triton(moments_kernel)[(nblocks, batch * hkv)](
        q, kmean, km2, seqlens, start, alibi_slopes if alibi_slopes is not None else q, mu, sigma, mom,
        q.stride(0), q.stride(1), q.stride(3), *pool_stats_strides(kmean, block_table),
        hq, hkv, hq // hkv, dim, num_pages, page_size, scale, per_prog, *table_args(block_table, seqlens),
        HAS_ALIBI=alibi_slopes is not None, HAS_START=has_start, BLOCK_G=block_g,
        BLOCK_P=cfg["BLOCK_PM"], BLOCK_D=max(16, cm.next_pow2(dim)),
        DOT_PREC=cm.exact_fp32_dot(dev) if dot_mode == 1 else ("tf32" if dev.type == "cuda" else "ieee"),
        DOT_MODE=dot_mode, UPCAST=dev.type != "cuda", num_warps=cfg["num_warps"],
    )
    if not mixture:
        return mu, sigma, mom, None
    tau = torch.empty((batch, hq), device=dev, dtype=torch.float32)
    wrap_triton(mixture_tau_kernel)[(batch * hq,)](
        mu, sigma, seqlens, start, tau, hq, num_pages, page_size, alpha - 1.0,
        HAS_START=has_start, BETA=beta, BLOCK_P=cfg["BLOCK_PS"], MAX_IT=MAX_ITERS,
        num_warps=cfg["num_warps"],
    )
    return mu, sigma, mom, tau


_ZTABLES: dict[tuple[str, int, float], Tensor] = {}
_STANDARD_NORMAL = statistics.NormalDist()


def page_max_z(device: torch.device, page_size: int, max_quantile: float) -> Tensor:
    """float32 ``[page_size]``: ``Phi^-1(max_quantile ** (1/n))`` for n = 1..P, built once per
    (device, P, quantile) and reused; a table made while tracing (a fake or functional tensor) is
    not kept, so a later trace or call never sees a tracer's placeholder as a constant."""
    key = (str(device), page_size, max_quantile)
    table = _ZTABLES.get(key)
    if table is None:
        # Python floats, not torch.special.ndtri: a trace (an engine export) then holds the
        # table as a constant instead of an ndtri that Inductor's Triton backend cannot lower.
        quantiles = (max_quantile ** (1.0 / n) for n in range(1, page_size + 1))
        values = [_STANDARD_NORMAL.inv_cdf(p) if 0.0 < p < 1.0 else math.copysign(math.inf, p - 0.5)
                  for p in quantiles]
        table = torch.tensor(values, dtype=torch.float32, device=device)
        if type(table) is torch.Tensor and device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            _ZTABLES[key] = table
    return table


@triton_op("entmaxkv::triton_select_pages", mutates_args=())
def triton_select_pages(
    q: Tensor, kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor, seqlens: Tensor,
    alibi_slopes: Optional[Tensor], page_size: int, alpha: float, scale: float, selector: str,
    token_budget: int, max_quantile: float, margin: float, tau_estimate: str, sink_pages: int,
    recent_pages: int, min_context: int, softcap: float = 0.0, row_start: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The registered op (positional ``alibi_slopes``); see :func:`select_pages`."""
    batch, hq, hkv, num_pages, _ = _stats_view(q, kmin, block_table)
    dev = q.device
    cfg = lookup("select", dev, "default", num_pages * page_size)
    group_size = hq // hkv
    page_indices = torch.empty((batch, hkv, num_pages), device=dev, dtype=torch.int32)
    num_selected = torch.empty((batch, hkv), device=dev, dtype=torch.int32)
    if selector == "topk":
        # The ranking is torch's top-k (a multi-block radix select): one (batch, KV head) per
        # program, as the old single-program radix kernel did, took 0.72 ms at 1M on an H200.
        bounds, _ = launch_quest(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes,
                                 per_head=True, group_max=False, softcap=softcap, block_table=block_table)
        valid = valid_page_mask(seqlens, page_size, num_pages)[:, None, :]
        forced = forced_page_mask(seqlens, page_size, num_pages, sink_pages, recent_pages)[:, None, :]
        if row_start is not None:  # as the reference: pages wholly below the start do not exist
            valid = valid & pages_from_start(row_start, page_size, num_pages)[:, None, :]
            forced = forced & valid
            bounds = torch.where(valid, bounds, float("-inf"))
        score = head_normalized_group_score(bounds, hkv)
        score = torch.where(forced, float("inf"), score)
        chosen = top_pages_lowest_id_ties(score, min(token_budget // page_size, num_pages))
        short = (seqlens < min_context)[:, None, None]
        return compact_page_mask((chosen | forced | short) & valid)
    if selector == "dense":  # every valid page from the first attended one: written directly
        has_start = row_start is not None
        wrap_triton(dense_pages_kernel)[(cm.cdiv(num_pages, cfg["BLOCK_PS"]), batch * hkv)](
            seqlens, row_start if has_start else seqlens, page_indices, num_selected, hkv, num_pages, page_size,
            HAS_START=has_start, BLOCK_P=cfg["BLOCK_PS"], num_warps=cfg["num_warps"],
        )
        return page_indices, num_selected
    # gaussian (integer beta; select_pages sends the others to the reference)
    beta = cm.integer_beta(alpha)
    mixture = tau_estimate == "mixture" or (tau_estimate == "auto" and alibi_slopes is not None)
    mu, sigma, mom, mixture_tau = _page_moments(q, kmean, km2, seqlens, page_size, alpha, scale, mixture,
                                                beta, alibi_slopes, row_start, block_table)
    solve = not mixture  # the keep kernel solves the single Gaussian from mom itself
    tau = mom if solve else mixture_tau  # (then its tau argument is a placeholder, never read)
    ztab = page_max_z(dev, page_size, max_quantile)
    nblocks = cm.cdiv(num_pages, cfg["BLOCK_PS"])
    flags = torch.empty((batch, hkv, num_pages), device=dev, dtype=torch.int8)
    counts = torch.empty((batch, hkv, nblocks), device=dev, dtype=torch.int32)
    mom_blocks = mom.shape[2] if solve else 1
    wrap_triton(keep_kernel)[(nblocks, batch * hkv)](
        mu, sigma, tau, ztab, seqlens, row_start if row_start is not None else seqlens, flags, counts,
        hq, hkv, group_size, num_pages, page_size, alpha - 1.0, margin, sink_pages,
        recent_pages, min_context, mom, mom_blocks, *tail_constants(beta),
        HAS_START=row_start is not None, BLOCK_G=cm.next_pow2(group_size), BLOCK_P=cfg["BLOCK_PS"],
        SOLVE=solve, BETA=beta, BLOCK_B=min(1024, cm.next_pow2(mom_blocks)), MAX_IT=MAX_ITERS,
        num_warps=cfg["num_warps"],
    )
    wrap_triton(compact_kernel)[(nblocks, batch * hkv)](
        flags, counts, page_indices, num_selected, num_pages,
        BLOCK_P=cfg["BLOCK_PS"], BLOCK_NB=max(16, cm.next_pow2(nblocks)),
        num_warps=cfg["num_warps"],
    )
    return page_indices, num_selected


def compact_page_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """bool ``[B, Hkv, Np]`` -> (``page_indices`` int32, ascending then -1, ``num_selected`` int32),
    as ``selection.compact_page_mask`` but with per-block counts and one compaction launch instead
    of a sort over the pages."""
    batch, hkv, num_pages = mask.shape
    block = lookup("select", mask.device, "default")["BLOCK_PS"]
    nblocks = cm.cdiv(num_pages, block)
    flags = mask.to(torch.int8)
    padded = torch.nn.functional.pad(flags, (0, nblocks * block - num_pages))
    counts = padded.view(batch, hkv, nblocks, block).sum(-1, dtype=torch.int32)
    page_indices = torch.empty((batch, hkv, num_pages), device=mask.device, dtype=torch.int32)
    num_selected = torch.empty((batch, hkv), device=mask.device, dtype=torch.int32)
    wrap_triton(compact_kernel)[(nblocks, batch * hkv)](
        flags, counts, page_indices, num_selected, num_pages,
        BLOCK_P=block, BLOCK_NB=max(16, cm.next_pow2(nblocks)), num_warps=4,
    )
    return page_indices, num_selected


def select_pages(
    q: Tensor, kmin: Tensor, kmax: Tensor, kmean: Tensor, km2: Tensor, seqlens: Tensor, *,
    page_size: int, alpha: float, scale: float, selector: str, token_budget: int,
    max_quantile: float, margin: float, tau_estimate: str, sink_pages: int, recent_pages: int,
    min_context: int, alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
    row_start: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Choose each KV head's pages: (``page_indices`` int32 ``[B, Hkv, Np]`` ascending then -1,
    ``num_selected`` int32 ``[B, Hkv]``), as the reference ``selection.select_pages``.

    The gaussian estimate runs on device for integer beta (alpha 2, 1.5, 4/3, 1.25); other alphas
    use the reference selector, which is pure torch on the same device (still sync-free).
    ``softcap > 0``: top-k ranks capped bounds; the gaussian selector works on the raw scores
    (see the reference's docstring for why). ``row_start``: the pages wholly below it are
    never selected, ranked or counted in the gaussian estimate (as the reference).
    ``block_table`` (int32 ``[B, max_pages]``): the statistics are per physical block
    ``[num_blocks, Hkv, D]`` (``runtime/paged.py``); the page indices stay logical.
    """
    if block_table is None:
        q = check_kernel_bound_inputs(q, kmin, kmax, kmean, km2, seqlens, page_size=page_size, alpha=alpha,
                                      scale=scale, alibi_slopes=alibi_slopes)
    else:
        check_paged_bound_inputs(q, block_table, kmin, kmax, kmean, km2)
    softcap = check_softcap(softcap)
    row_start = check_row_start(row_start, q.shape[0], device=q.device)
    if selector not in PAGE_SELECTORS:
        raise ValueError(f"selector must be one of {PAGE_SELECTORS}, got {selector!r}")
    if tau_estimate not in TAU_ESTIMATES:
        raise ValueError(f"tau_estimate must be one of {TAU_ESTIMATES}, got {tau_estimate!r}")
    if not isinstance(token_budget, int) or token_budget < page_size:
        raise ValueError(f"token_budget must be an int >= page_size ({page_size}), "
                         f"got {token_budget!r}")
    if isinstance(max_quantile, bool) or not isinstance(max_quantile, (int, float)) \
            or not 0.0 < max_quantile < 1.0:
        raise ValueError(f"max_quantile must be a float in (0, 1), got {max_quantile!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite float, got {margin!r}")
    for name, value in (("sink_pages", sink_pages), ("recent_pages", recent_pages),
                        ("min_context", min_context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if selector == "gaussian" and cm.integer_beta(float(alpha)) is None:
        from .reference import select_pages as reference_select
        if block_table is not None:  # the reference reads the per-row layout
            kmin, kmax, kmean, km2 = gather_stats(block_table, seqlens, page_size, kmin, kmax, kmean, km2)
        return reference_select(
            q, kmin, kmax, kmean, km2, seqlens, page_size=page_size, alpha=alpha, scale=scale,
            selector=selector, token_budget=token_budget, max_quantile=max_quantile,
            margin=margin, tau_estimate=tau_estimate, sink_pages=sink_pages,
            recent_pages=recent_pages, min_context=min_context, alibi_slopes=alibi_slopes, softcap=softcap,
            row_start=row_start)
    return triton_select_pages(
        q, kmin, kmax, kmean, km2, seqlens, alibi_slopes, int(page_size), float(alpha),
        float(scale), selector, int(token_budget), float(max_quantile), float(margin),
        tau_estimate, int(sink_pages), int(recent_pages), int(min_context), softcap, row_start, block_table)


@triton_op("entmaxkv::triton_quest_bounds", mutates_args=())
def triton_quest_bounds(q: Tensor, kmin: Tensor, kmax: Tensor, seqlens: Tensor,
                        alibi_slopes: Optional[Tensor], page_size: int, scale: float,
                        softcap: float = 0.0, block_table: Optional[Tensor] = None) -> Tensor:
    """The registered op (positional ``alibi_slopes``); see :func:`quest_bounds`."""
    bounds, _ = launch_quest(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes,
                             per_head=True, group_max=False, softcap=softcap, block_table=block_table)
    return bounds


def quest_bounds(q: Tensor, kmin: Tensor, kmax: Tensor, seqlens: Tensor, *, page_size: int,
                 scale: float, alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
                 block_table: Optional[Tensor] = None) -> Tensor:
    """Quest bound per query head and page, float32 ``[B, Hq, Npages]``, -inf on invalid pages
    (soft-capped when ``softcap > 0``; per-block statistics read through ``block_table``)."""
    if block_table is None:
        q = check_kernel_bound_inputs(q, kmin, kmax, None, None, seqlens, page_size=page_size, alpha=2.0,
                                      scale=scale, alibi_slopes=alibi_slopes)
    else:
        check_paged_bound_inputs(q, block_table, kmin, kmax)
    return triton_quest_bounds(q, kmin, kmax, seqlens, alibi_slopes, int(page_size), float(scale),
                               check_softcap(softcap), block_table)
