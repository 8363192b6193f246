"""The int8 key sketch on device: ops ``entmaxkv::triton_sketch_prefill_``,
``entmaxkv::triton_sketch_append_`` and ``entmaxkv::triton_sketch_page_bounds``; same arguments and
results as ``sketch/reference.py`` (codes and scales bit for bit, bounds to float32 rounding).

``entmaxkv::triton_sketch_select`` is the certified step's selection in one pass over the whole
sketch (``sketch_kernels.scan_kernel``: page upper bounds and the lower bounds that can reach
the threshold), the decode's exact threshold solve on the lower bounds (the floor), then the
keep flags and the compaction of the selection kernels: 2176 bytes per page and KV head at
P = 16, D = 128, against 4096 for the K page the dense exact step reads.

Bytes: an append reads one K row and writes ``D + 2 ceil(D/32)`` bytes per KV head; a bound step
reads, per candidate page and KV head, ``P (D + 2 ceil(D/32))`` bytes of sketch (2176 B at P = 16,
D = 128: 53% of the fp16 K page) and nothing for the other pages; it writes 4 bytes per page and
query head. Fixed grids, lengths as runtime arguments: no host sync, no recompilation as the
cache grows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ...checks import (
    KERNEL_DTYPES,
    check_kernel_cache,
    check_lengths,
    check_page_size,
    check_sketch_bound_inputs,
    check_sketch_buffers,
    num_pages_for,
    sketch_groups,
)
from .. import _common as cm
from ..attend.kernel import solve_tau
from ..select.select_kernels import compact_kernel
from ..tuning.tuned import decode_config, lookup
from .reference import ABS_SLACK, HALF_STEP, bound_rel_slack
from .sketch_kernels import append_kernel, bounds_kernel, keep_kernel, prefill_kernel, scan_kernel

PREFILL_ROWS = 64  # rows per prefill program
BOUND_PAGES = 4  # pages per bound program: each non-candidate page costs one flag load


def _check_update(k_cache: Tensor, lengths: Tensor, name: str, codes: Tensor, scales: Tensor) -> None:
    check_kernel_cache("k_cache", k_cache)
    batch, kv_heads, capacity, head_dim = k_cache.shape
    check_lengths(name, lengths, batch, device=k_cache.device)
    check_sketch_buffers(codes, scales, batch=batch, kv_heads=kv_heads, capacity=capacity,
                         head_dim=head_dim)
    if codes.device != k_cache.device:
        raise ValueError(f"codes/scales must be on k_cache's device {k_cache.device}, got {codes.device}")


@triton_op("entmaxkv::triton_sketch_prefill_", mutates_args={"codes", "scales"})
def sketch_prefill_(k_cache: Tensor, seqlens: Tensor, codes: Tensor, scales: Tensor) -> None:
    """Quantise the first ``seqlens[b]`` rows of ``k_cache`` into the sketch (zeros past them)."""
    _check_update(k_cache, seqlens, "seqlens", codes, scales)
    batch, hkv, capacity, dim = k_cache.shape
    wrap_triton(prefill_kernel)[(cm.cdiv(capacity, PREFILL_ROWS), batch * hkv)](
        k_cache, seqlens, codes, scales, *k_cache.stride(), *codes.stride(), *scales.stride(),
        hkv, dim, capacity, GROUPS=sketch_groups(dim), BLOCK_T=PREFILL_ROWS, num_warps=4,
    )


@triton_op("entmaxkv::triton_sketch_append_", mutates_args={"codes", "scales"})
def sketch_append_(k_cache: Tensor, positions: Tensor, codes: Tensor, scales: Tensor) -> None:
    """Quantise the row written at ``positions[b]`` of each sequence: O(D) per KV head."""
    _check_update(k_cache, positions, "positions", codes, scales)
    batch, hkv, capacity, dim = k_cache.shape
    wrap_triton(append_kernel)[(batch * hkv,)](
        k_cache, positions, codes, scales, *k_cache.stride(), *codes.stride(), *scales.stride(),
        hkv, dim, capacity, GROUPS=sketch_groups(dim), num_warps=1,
    )


@triton_op("entmaxkv::triton_sketch_page_bounds", mutates_args=())
def triton_sketch_page_bounds(
    q: Tensor,
    codes: Tensor,
    scales: Tensor,
    seqlens: Tensor,
    candidates: Tensor,
    alibi_slopes: Optional[Tensor],
    page_size: int,
    scale: float,
) -> Tensor:
    """The registered op; positional ``alibi_slopes`` (custom ops take no kwarg-only tensors)."""
    batch, hq, _, dim = q.shape
    hkv, capacity = codes.shape[1], codes.shape[2]
    group = hq // hkv
    num_pages = num_pages_for(capacity, page_size)
    out = torch.empty((batch, hq, num_pages), device=q.device, dtype=torch.float32)
    has_alibi = alibi_slopes is not None
    wrap_triton(bounds_kernel)[(batch * hkv, cm.cdiv(num_pages, BOUND_PAGES))](
        q, codes, scales, seqlens, candidates, alibi_slopes if has_alibi else q, out,
        q.stride(0), q.stride(1), q.stride(3), *codes.stride(), *scales.stride(),
        *candidates.stride(),
        hq, hkv, group, dim, capacity, num_pages, page_size, scale, bound_rel_slack(dim),
        ABS_SLACK, HALF_STEP,
        HAS_ALIBI=has_alibi, GROUPS=sketch_groups(dim), PAGES=BOUND_PAGES,
        BLOCK_G=cm.next_pow2(group), BLOCK_T=page_size, num_warps=4,
    )
    return out


def sketch_page_bounds(
    q: Tensor,
    codes: Tensor,
    scales: Tensor,
    seqlens: Tensor,
    candidates: Tensor,
    *,
    page_size: int,
    scale: float,
    alibi_slopes: Optional[Tensor] = None,
) -> Tensor:
    """Upper bounds of each candidate page's largest score per query head, float32
    ``[B, Hq, Npages]`` (``-inf`` off the candidates); see ``reference.sketch_page_bounds``."""
    page_size, scale = check_sketch_bound_inputs(q, codes, scales, seqlens, candidates, page_size,
                                                 scale, alibi_slopes)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton kernels, got {q.dtype}")
    return triton_sketch_page_bounds(q, codes, scales, seqlens, candidates, alibi_slopes,
                                     check_page_size(page_size), float(scale))


@triton_op("entmaxkv::triton_sketch_select", mutates_args=())
def triton_sketch_select(
    q: Tensor,
    codes: Tensor,
    scales: Tensor,
    seqlens: Tensor,
    read_all: Tensor,
    alibi_slopes: Optional[Tensor],
    page_size: int,
    alpha: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The registered op; see :func:`sketch_select`."""
    batch, hq, _, dim = q.shape
    hkv, capacity = codes.shape[1], codes.shape[2]
    group = hq // hkv
    num_pages = num_pages_for(capacity, page_size)
    dev = q.device
    f32 = torch.float32
    cfg = decode_config(dev, q.dtype, dim, group, page_size, capacity)
    scan = lookup("select", dev, "default", capacity)
    splits = cm.decode_splits(batch, hkv, num_pages, dev, scan["SCAN_PROGRAMS_PER_SM"])
    seg = cm.cdiv(num_pages, splits) * page_size
    cand_z = torch.empty((batch, hq, splits * seg), device=dev, dtype=f32)
    cand_cnt = torch.empty((batch, hkv, splits), device=dev, dtype=torch.int32)
    split_max = torch.empty((batch, hq, splits), device=dev, dtype=f32)
    page_ub = torch.empty((batch, hq, num_pages), device=dev, dtype=f32)
    tau = torch.empty((batch, hq), device=dev, dtype=f32)
    has_alibi = alibi_slopes is not None
    # scale groups, padded for the group-spread dot; never one (a single-group head dim, D <= 32,
    # computed wrong floors on the H200 with size-1 group axes; an empty group adds zeros)
    group_rows = max(2, cm.next_pow2(sketch_groups(dim)))
    wrap_triton(scan_kernel)[(batch * hkv, splits)](
        q, codes, scales, seqlens, read_all, alibi_slopes if has_alibi else q,
        cand_z, cand_cnt, split_max, page_ub,
        q.stride(0), q.stride(1), q.stride(3), *codes.stride(), *scales.stride(),
        hq, hkv, group, dim, splits, seg, num_pages, capacity, scale, alpha - 1.0,
        bound_rel_slack(dim), ABS_SLACK, HALF_STEP,
        HAS_ALIBI=has_alibi, GROUPS=sketch_groups(dim), GROUP_ROWS=group_rows, PAGE=page_size,
        BLOCK_G=max(cm.next_pow2(group), 16 // group_rows), BLOCK_N=max(scan["SCAN_BLOCK_N"], page_size),
        BLOCK_D=group_rows * 32,
        DOT_PREC=cm.dot_precision(dev, q.dtype), UPCAST=cm.dot_upcast(dev, q.dtype),
        CODES_FP16=dev.type == "cuda" and q.dtype == torch.float16 and scan["SCAN_FAST_CODES"],
        num_warps=scan["SCAN_WARPS"],
    )
    solve_tau(cand_z, cand_cnt, split_max, tau, batch, hq, hkv, group, splits, seg, alpha, cfg)
    block_p = scan["BLOCK_PS"]
    nblocks = cm.cdiv(num_pages, block_p)
    flags = torch.empty((batch, hkv, num_pages), device=dev, dtype=torch.int8)
    counts = torch.empty((batch, hkv, nblocks), device=dev, dtype=torch.int32)
    floor = torch.empty((batch, hq), device=dev, dtype=f32)
    wrap_triton(keep_kernel)[(nblocks, batch * hkv)](
        page_ub, tau, seqlens, read_all, flags, counts, floor,
        hq, hkv, group, num_pages, page_size, alpha - 1.0,
        BLOCK_G=cm.next_pow2(group), BLOCK_P=block_p,
    )
    page_indices = torch.empty((batch, hkv, num_pages), device=dev, dtype=torch.int32)
    num_selected = torch.empty((batch, hkv), device=dev, dtype=torch.int32)
    wrap_triton(compact_kernel)[(nblocks, batch * hkv)](
        flags, counts, page_indices, num_selected, num_pages,
        BLOCK_P=block_p, BLOCK_NB=max(16, cm.next_pow2(nblocks)),
    )
    return page_indices, num_selected, floor


def sketch_select(
    q: Tensor,
    codes: Tensor,
    scales: Tensor,
    seqlens: Tensor,
    read_all: Tensor,
    *,
    page_size: int,
    alpha: float,
    scale: float,
    alibi_slopes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The certified step's selection from the int8 key sketch; see
    ``reference.sketch_select`` (same results; the floor to float32 rounding of the threshold
    solve, which its ``2^-12`` rounding-down covers)."""
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton kernels, got {q.dtype}")
    return triton_sketch_select(q, codes, scales, seqlens, read_all, alibi_slopes,
                                check_page_size(page_size), float(alpha), float(scale))
