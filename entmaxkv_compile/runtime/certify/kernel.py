"""The support certificate on device, as ``certify.reference``.

- ``entmaxkv::triton_certify`` (:func:`certify`, the certificate and dropped-mass bound of any
  selection): the Quest bounds of all pages come from one read of kmin/kmax per KV head
  (``quest_kernel``), then fixed-shape elementwise work on the ``[B, Hq, Npages]`` bounds.
- ``entmaxkv::triton_certify_pages`` (:func:`certify_pages`, the certified round): the selected
  pages become flags (``mark_pages_kernel``), one kernel reads kmin/kmax, bounds every page in
  registers and flags the pages to read, and the flags are compacted (``compact_kernel``). No
  bounds tensor, no elementwise passes, no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ...checks import check_kernel_bound_inputs, check_kernel_page_table, check_softcap, check_stats_valid
from .. import _common as cm
from ..paged import check_paged_bound_inputs, logical_pages, pool_stats_strides, table_args
from ..select.kernel import launch_quest
from ..select.select_kernels import compact_kernel
from ..tuning.tuned import lookup
from .certify_kernels import certified_heads_kernel, mark_pages_kernel, policy_update_kernel, violation_kernel
from .reference import certificate_inputs_ok


@triton_op("entmaxkv::triton_certify", mutates_args=())
def triton_certify(
    q: Tensor, kmin: Tensor, kmax: Tensor, seqlens: Tensor, page_indices: Tensor,
    num_selected: Tensor, tau: Tensor, alibi_slopes: Optional[Tensor], page_size: int,
    alpha: float, scale: float, stats_valid: Optional[Tensor] = None, softcap: float = 0.0,
    block_table: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The registered op (positional ``alibi_slopes``); see :func:`certify`."""
    batch, hq = q.shape[:2]
    hkv, num_pages = kmin.shape[1], logical_pages(kmin, block_table)
    bounds, _ = launch_quest(q, kmin, kmax, seqlens, page_size, scale, alibi_slopes,
                             per_head=True, group_max=False, softcap=softcap, block_table=block_table)
    slots = torch.arange(num_pages, device=q.device)
    used = slots < num_selected[..., None]
    target = torch.where(used, page_indices.to(torch.int64), num_pages)
    selected = torch.zeros((batch, hkv, num_pages + 1), dtype=torch.bool, device=q.device)
    selected.scatter_(2, target, True)
    selected = selected[..., :num_pages].repeat_interleave(hq // hkv, dim=1)
    counts = (seqlens.to(torch.int64)[:, None] - slots[None, :] * page_size).clamp(0, page_size)
    unselected = ~selected & (counts > 0)[:, None, :]
    excess = (alpha - 1.0) * bounds - tau.to(torch.float32)[..., None]
    trusted = certificate_inputs_ok(excess, tau, seqlens, page_size, stats_valid)
    certified = trusted & ~(unselected & (excess > 0)).any(-1)
    mass = counts[:, None, :].to(torch.float32) * excess.clamp(min=0) ** (1.0 / (alpha - 1.0))
    delta = torch.where(unselected & trusted[..., None], mass, 0.0).sum(-1).clamp(max=1.0)
    return certified, torch.where(trusted, delta, 1.0)


def certify(
    q: Tensor, kmin: Tensor, kmax: Tensor, seqlens: Tensor, page_indices: Tensor,
    num_selected: Tensor, tau: Tensor, *, page_size: int, alpha: float, scale: float,
    alibi_slopes: Optional[Tensor] = None, stats_valid: Optional[Tensor] = None, softcap: float = 0.0,
    block_table: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(certified bool [B, Hq], delta_bound float32 [B, Hq])`` of a selection.

    Certified when every unselected valid page has ``(alpha-1) u_p <= tau``; ``delta_bound =
    min(1, sum_unselected n_p [(alpha-1) u_p - tau]_+^beta)``. As the reference
    ``certify.reference.certify``: never certified (and ``delta_bound = 1``) where q, the slope, the stats of
    a valid page or tau are not finite, the length is outside ``[1, Npages * P]`` or
    ``stats_valid`` (bool ``[B]``) is False. ``softcap > 0``: ``u_p`` is the capped bound (exact:
    the cap is increasing, so an upper bound of s maps to an upper bound of c). ``block_table``:
    per-block statistics ``[num_blocks, Hkv, D]`` read through it (``runtime/paged.py``).
    """
    if block_table is None:
        q = check_kernel_bound_inputs(q, kmin, kmax, None, None, seqlens, page_size=page_size, alpha=alpha,
                                      scale=scale, alibi_slopes=alibi_slopes)
    else:
        check_paged_bound_inputs(q, block_table, kmin, kmax)
    batch, hkv, num_pages = q.shape[0], kmin.shape[1], logical_pages(kmin, block_table)
    check_kernel_page_table(page_indices, num_selected, batch=batch, kv_heads=hkv, num_pages=num_pages,
                            device=q.device)
    if not isinstance(tau, Tensor) or tuple(tau.shape) != tuple(q.shape[:2]) \
            or not tau.is_floating_point():
        raise ValueError(f"tau must be a float tensor of shape {list(q.shape[:2])}")
    check_stats_valid(stats_valid, batch, q.device)
    return triton_certify(q, kmin, kmax, seqlens, page_indices, num_selected, tau, alibi_slopes,
                          int(page_size), float(alpha), float(scale), stats_valid, check_softcap(softcap),
                          block_table)


@triton_op("entmaxkv::triton_certify_pages", mutates_args=())
def triton_certify_pages(
    q: Tensor, kmin: Tensor, kmax: Tensor, seqlens: Tensor, page_indices: Tensor, num_selected: Tensor,
    tau: Tensor, read_all: Tensor, alibi_slopes: Optional[Tensor], page_size: int, alpha: float,
    scale: float, softcap: float = 0.0, block_table: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The registered op (positional ``alibi_slopes``); see :func:`certify_pages`."""
    batch, hq = q.shape[:2]
    hkv, num_pages, dim = kmin.shape[1], logical_pages(kmin, block_table), kmin.shape[-1]
    dev = q.device
    block = lookup("select", dev, "default")["BLOCK_P"]
    nblocks = cm.cdiv(num_pages, block)
    selected = torch.zeros((batch, hkv, num_pages), device=dev, dtype=torch.int8)
    wrap_triton(mark_pages_kernel)[(nblocks, batch * hkv)](
        page_indices, num_selected, selected, num_pages, BLOCK=block, num_warps=4)
    flags = torch.empty((batch, hkv, num_pages), device=dev, dtype=torch.int8)
    counts = torch.empty((batch, hkv, nblocks), device=dev, dtype=torch.int32)
    finite = torch.ones((batch, hq), device=dev, dtype=torch.int8)
    page_indices = torch.empty((batch, hkv, num_pages), device=dev, dtype=torch.int32)
    num_selected = torch.empty((batch, hkv), device=dev, dtype=torch.int32)
    wrap_triton(violation_kernel)[(nblocks, batch * hkv)](
        q, kmin, kmax, seqlens, alibi_slopes if alibi_slopes is not None else q,
        tau.to(torch.float32), selected, read_all.view(torch.int8),
        flags, counts, finite,
        q.stride(0), q.stride(1), q.stride(3), *pool_stats_strides(kmin, block_table),
        hq, hkv, hq // hkv, dim, num_pages, page_size, scale, softcap if softcap else 1.0, alpha - 1.0,
        *table_args(block_table, seqlens),
        HAS_ALIBI=alibi_slopes is not None, SOFTCAP=bool(softcap), BLOCK_G=max(16, cm.next_pow2(hq // hkv)),
        BLOCK_P=block, BLOCK_D=max(16, cm.next_pow2(dim)),
        DOT_PREC=cm.dot_precision(dev, q.dtype), UPCAST=cm.dot_upcast(dev, q.dtype),
        num_warps=4,
    )
    wrap_triton(compact_kernel)[(nblocks, batch * hkv)](
        flags, counts, page_indices, num_selected, num_pages,
        BLOCK_P=block, BLOCK_NB=max(16, cm.next_pow2(nblocks)), num_warps=4,
    )
    return page_indices, num_selected, finite != 0


def certify_pages(
    q: Tensor, kmin: Tensor, kmax: Tensor, seqlens: Tensor, page_indices: Tensor, num_selected: Tensor,
    tau: Tensor, read_all: Tensor, *, page_size: int, alpha: float, scale: float,
    alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0, block_table: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The pages a certified round reads, as the reference ``certify.reference.certify_pages``:
    ``(page_indices, num_selected, bounds_finite)``, with capped bounds when ``softcap > 0``
    (per-block statistics read through ``block_table``). Trusts its caller (the step)."""
    return triton_certify_pages(q, kmin, kmax, seqlens, page_indices, num_selected, tau, read_all,
                                alibi_slopes, int(page_size), float(alpha), float(scale), float(softcap),
                                block_table)


@triton_op("entmaxkv::triton_certified_heads", mutates_args=())
def triton_certified_heads(tau: Tensor, bounds_finite: Tensor, seqlens: Tensor, stats_ok: Tensor,
                           capacity: int) -> tuple[Tensor, Tensor]:
    """The registered op; see :func:`certified_heads`."""
    batch, hq = tau.shape
    certified = torch.empty((batch, hq), device=tau.device, dtype=torch.bool)
    delta = torch.empty((batch, hq), device=tau.device, dtype=torch.float32)
    wrap_triton(certified_heads_kernel)[(batch,)](
        tau, bounds_finite.view(torch.int8), seqlens, stats_ok.view(torch.int8), certified.view(torch.int8),
        delta, hq, capacity, BLOCK_H=max(16, cm.next_pow2(hq)), num_warps=1)
    return certified, delta


def certified_heads(tau: Tensor, bounds_finite: Tensor, seqlens: Tensor, stats_ok: Tensor, *,
                    capacity: int) -> tuple[Tensor, Tensor]:
    """``(certified, delta_bound)`` after a certified round, as ``certify.reference.certified_heads``."""
    return triton_certified_heads(tau.to(torch.float32), bounds_finite, seqlens, stats_ok, int(capacity))


@triton_op("entmaxkv::triton_certify_policy_update", mutates_args=("certify_skip",))
def triton_certify_policy_update(certify_skip: Tensor, dense_rows: Tensor, num_selected: Tensor,
                                 seqlens: Tensor, page_size: int, num_pages: int, dense_above: float,
                                 probe_every: int) -> None:
    """The registered op; see ``certify/policy.certify_policy_update_`` (same arguments)."""
    batch, hkv = num_selected.shape
    wrap_triton(policy_update_kernel)[(batch,)](
        certify_skip, dense_rows.view(torch.int8), num_selected, seqlens, hkv, num_pages, page_size,
        dense_above, probe_every, BLOCK_K=max(16, cm.next_pow2(hkv)), num_warps=1)


def certify_policy_update_(certify_skip: Tensor, dense_rows: Tensor, num_selected: Tensor, seqlens: Tensor, *,
                           page_size: int, num_pages: int, dense_above: float, probe_every: int) -> None:
    """``certify/policy.certify_policy_update_`` in one launch."""
    triton_certify_policy_update(certify_skip, dense_rows, num_selected, seqlens, int(page_size),
                                 int(num_pages), float(dense_above), int(probe_every))
