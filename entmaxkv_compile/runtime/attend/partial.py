"""The decode kernels in parts, for a threshold that is solved elsewhere (context parallel decode).

One rank of a sharded cache holds some of every query head's scores. Full entmax needs the one
threshold of all of them; these functions give a rank what it needs to take part, without moving
scores it does not have to:

1. :func:`local_candidates`: the K pass over the rank's selected pages and its *local* exact
   threshold ``tau_r`` (the decode kernels' split-parallel solve, ``kernel.py``). Because
   ``f(t) = sum_i [z_i - t]_+^beta`` only grows when scores are added, the global threshold is at
   least every ``tau_r``, so at least ``tau_lo = max_r tau_r``.
2. :func:`gather_above`: this rank's scores above a floor (``tau_lo``), compacted into a small
   fixed buffer per head (and how many there were): the global support lies among them, so the
   threshold of all ranks' gathered scores together is the global threshold.
3. :func:`partial_sums`: the V pass at a given threshold, ``sum p v`` and ``sum p`` over the
   rank's tokens, unnormalised, to be summed over the ranks.

Bytes per step: the selected K rows once, the candidates' scores (4 bytes per head), V only for
the rows in the support; the buffers returned for the collectives are ``[B, Hq, cap]`` and
``[B, Hq, D]``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .. import _common as cm
from .kernel import output_partials, plan_splits, score_candidates, solve_tau

__all__ = ["LocalCandidates", "gather_above", "local_candidates", "partial_sums"]


class LocalCandidates(NamedTuple):
    """One rank's K pass: the candidate buffers of ``score_candidates``, the local exact threshold
    ``tau`` ``[B, Hq]`` (``+inf`` where the rank attends nothing, NaN for a poisoned head), the V
    pass's scratch and the tuned config."""

    cand_z: Tensor
    cand_tok: Tensor
    cand_cnt: Tensor
    tau: Tensor
    scratch: Tensor
    cfg: dict


def local_candidates(q: Tensor, k_cache: Tensor, seqlens: Tensor, page_indices: Tensor, num_selected: Tensor, *,
                     page_size: int, alpha: float, scale: float,
                     alibi_slopes: Optional[Tensor] = None) -> LocalCandidates:
    """The K pass and the local threshold over the selected pages (arguments as ``paged_decode``)."""
    batch, hq = q.shape[:2]
    hkv = k_cache.shape[1]
    cfg, splits, seg = plan_splits(q, page_indices, page_size)
    cand_z, cand_tok, cand_cnt, split_max = score_candidates(
        q, k_cache, seqlens, page_indices, num_selected, alibi_slopes, page_size, alpha, scale, cfg, splits, seg)
    tau = torch.empty((batch, hq), device=q.device, dtype=torch.float32)
    scratch = solve_tau(cand_z, cand_cnt, split_max, tau, batch, hq, hkv, hq // hkv, splits, seg, alpha, cfg)[0]
    return LocalCandidates(cand_z, cand_tok, cand_cnt, tau, scratch, cfg)


@triton.jit
def above_kernel(cand_z_ptr, cand_cnt_ptr, floor_ptr, out_z_ptr, out_cnt_ptr, Hq, Hkv, G, num_splits, seg, CAP,
                 BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """One (sequence x KV head, split): append the split's candidates above each head's floor to
    the head's row of ``out_z`` (``CAP`` slots; the count keeps counting past it)."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, BLOCK_T)
    gmask = offs_g < G
    rows = b * Hq + hk * G + offs_g
    floor = tl.load(floor_ptr + rows, mask=gmask, other=float("inf"))
    count = tl.load(cand_cnt_ptr + pid_bh * num_splits + split)
    z_base = cand_z_ptr + rows[:, None].to(tl.int64) * (num_splits * seg) + split * seg
    for t in range(0, count, BLOCK_T):
        tt = t + offs_t
        z = tl.load(z_base + tt[None, :], mask=gmask[:, None] & (tt < count)[None, :], other=float("-inf"))
        keep = (z > floor[:, None]).to(tl.int32)
        kept = tl.sum(keep, axis=1)
        base = tl.atomic_add(out_cnt_ptr + rows, kept, mask=gmask & (kept > 0))
        slot = base[:, None] + tl.cumsum(keep, axis=1) - keep
        tl.store(out_z_ptr + rows[:, None].to(tl.int64) * CAP + slot, z, mask=(keep > 0) & (slot < CAP))


def gather_above(local: LocalCandidates, floor: Tensor, cap: int) -> tuple[Tensor, Tensor]:
    """``(z [B, Hq, cap], count [B, Hq] int32)``: the rank's candidate scores above ``floor``
    ``[B, Hq]`` (float32, z units), in no particular order, ``-inf`` padded, and how many there
    were (more than ``cap`` means some were left out)."""
    batch, hq, width = local.cand_z.shape
    hkv, splits = local.cand_cnt.shape[1], local.cand_cnt.shape[2]
    out_z = torch.full((batch, hq, cap), float("-inf"), device=floor.device, dtype=torch.float32)
    count = torch.zeros((batch, hq), device=floor.device, dtype=torch.int32)
    wrap_triton(above_kernel)[(batch * hkv, splits)](
        local.cand_z, local.cand_cnt, floor.contiguous(), out_z, count, hq, hkv, hq // hkv, splits,
        width // splits, cap, BLOCK_G=max(16, cm.next_pow2(hq // hkv)), BLOCK_T=local.cfg["BLOCK_T"],
    )
    return out_z, count


def partial_sums(local: LocalCandidates, v_cache: Tensor, tau: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(sum p v [B, Hq, D], sum p [B, Hq])`` over this rank's candidates at the thresholds ``tau``
    ``[B, Hq]`` (float32, z units), unnormalised."""
    o_part, l_part = output_partials(v_cache, local.cand_z, local.cand_tok, local.cand_cnt, tau.contiguous(),
                                     local.scratch, alpha, local.cfg)
    return o_part.sum(2), l_part.sum(2)
