"""Fused sparse entmax decode over selected KV pages: the ``entmaxkv::triton_paged_decode`` op.

Same arguments and results as the reference ``attend.reference.paged_decode``. Over all pages it
is the dense entmax decode. Bytes moved per step: the selected K rows once, 4 bytes per head for
each candidate score (written once, read twice; a token is a candidate when its score is within 1
of its split's running max), and V only for rows inside the support of some head of the group.
Launches: the K pass, two for the threshold, the output pass and the split reduction, on a grid
of ``PROGRAMS_PER_SM`` programs per multiprocessor (tuned per length bucket).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import _common as cm
from ...checks import check_kernel_decode_inputs as check_decode_inputs
from ...checks import check_row_start, check_softcap
from ..paged import cache_geometry as _cache_geometry
from ..paged import check_paged_decode_inputs, table_args
from ..tuning.tuned import decode_config
from .decode_kernels import blocks_kernel, output_kernel, reduce_kernel, score_kernel
from .tau_kernels import FLOOR_STEPS, NEWTON_STEPS, NUM_PIVOTS, NUM_SLOTS, tau_first_kernel, tau_second_kernel


def tau_levels(alpha: float) -> int:
    """Pivot levels of the tau search: each narrows the bracket >= 15-fold and, for integer beta,
    most heads certify at level 1-3; general beta needs the bracket under float32 resolution."""
    return 5 if cm.integer_beta(alpha) else 8


def solve_tau(cand_z, cand_cnt, split_max, tau, batch, hq, hkv, group, splits, seg, alpha, cfg):
    """The exact threshold of every query head from the candidates of a K pass (``cand_z``
    ``[B, Hq, splits * seg]`` compacted per split, ``cand_cnt`` ``[B, Hkv, splits]``,
    ``split_max`` ``[B, Hq, splits]``, NaN for a poisoned head) into ``tau`` ``[B, Hq]``
    (tau_kernels.py): levels 1 and 2 split-parallel, the rest in the last program of each head
    to finish level 2. Returns the survivor buffer ``[2, B * Hq, cap]``, free for the output
    pass's use."""
    dev = cand_z.device
    f32 = torch.float32
    rows = batch * hq
    cap = splits * seg
    state = torch.empty((2, rows, 4), device=dev, dtype=f32)
    pivots = torch.empty((2, rows, NUM_PIVOTS), device=dev, dtype=f32)
    # ``TAU_PROGRAMS_PER_SM`` programs per multiprocessor, each walking a run of splits: enough
    # to hide latency when every token is a candidate, few enough that a light level is one wave.
    chunks = max(1, min(splits, cm.cdiv(cfg["TAU_PROGRAMS_PER_SM"] * cm.sm_count(dev), rows)))
    per_prog = cm.cdiv(splits, chunks)
    chunks = cm.cdiv(splits, per_prog)
    part = torch.empty((2, rows, chunks, NUM_SLOTS, NUM_PIVOTS), device=dev, dtype=f32)
    survivors = torch.empty((2, rows, cap), device=dev, dtype=f32)
    counts = torch.empty((2, rows, chunks), device=dev, dtype=torch.int32)
    tickets = torch.empty((rows,), device=dev, dtype=torch.int32)  # zeroed by tau_first_kernel
    rmax = cm.integer_beta(alpha) or 0  # 0: general beta, no closed-form certificate
    beta = 1.0 / (alpha - 1.0)
    block_t = cfg["BLOCK_TAU"]
    block_c = cm.next_pow2(chunks)
    common = dict(RMAX=rmax, NP=NUM_PIVOTS, num_warps=cfg["tau_warps"])
    wrap_triton(tau_first_kernel)[(rows, chunks)](
        cand_z, cand_cnt, split_max, survivors, counts[0], state[0], part[0], pivots[0], tickets,
        hq, hkv, group, splits, seg, alpha - 1.0, beta, math.log2(cap), per_prog, chunks,
        BLOCK_S=cm.next_pow2(splits), BLOCK_T=block_t, BLOCK_K=8 * block_t, BLOCK_R=cm.next_pow2(per_prog),
        FLOOR_STEPS=FLOOR_STEPS,
        **common,
    )
    wrap_triton(tau_second_kernel)[(rows, chunks)](
        part[0], pivots[0], state[0], survivors, counts[0], part[1], pivots[1], state[1],
        counts[1], tickets, tau, rows, cap, per_prog * seg, chunks, beta, tau_levels(alpha),
        BLOCK_C=block_c, BLOCK_TC=max(1, 1024 // block_c), BLOCK_T=block_t, STEPS=NEWTON_STEPS,
        **common,
    )
    return survivors


def selected_blocks(page_indices: Tensor, block_table: Tensor) -> Tensor:
    """``paged.selected_blocks`` (its reference) in one launch: int32 ``[B, Hkv, S]``, the block
    of every selected page, -1 where none is selected."""
    batch, hkv, width = page_indices.shape
    page_indices = page_indices.contiguous()
    out = torch.empty((batch, hkv, width), device=page_indices.device, dtype=torch.int32)
    block = min(1024, cm.next_pow2(width))
    wrap_triton(blocks_kernel)[(batch * hkv, cm.cdiv(width, block))](
        page_indices, block_table, out, hkv, width, block_table.stride(0), block_table.stride(1), BLOCK=block)
    return out


def plan_splits(q: Tensor, page_indices: Tensor, page_size: int, sparse: bool = True) -> tuple[dict, int, int]:
    """``(cfg, splits, seg)``: the tuned config of this decode (``sparse``: over a page selection,
    not every page), the K pass's splits per KV head (``PROGRAMS_PER_SM`` programs per
    multiprocessor) and the tokens each split covers."""
    batch, _, _, dim = q.shape
    hkv, num_pages = page_indices.shape[1], page_indices.shape[2]
    cfg = decode_config(q.device, q.dtype, dim, q.shape[1] // hkv, page_size, num_pages * page_size, sparse)
    splits = cm.decode_splits(batch, hkv, num_pages, q.device, cfg["PROGRAMS_PER_SM"])
    # a split's segment holds the most pages the K pass may give it (at least MIN_SPLIT_PAGES)
    pages_per_split = max(cm.cdiv(num_pages, splits), min(cfg["MIN_SPLIT_PAGES"], num_pages))
    return cfg, splits, pages_per_split * page_size


def slot_tiles(cfg: dict, page_size: int) -> bool:
    """Whether the K pass loads its tiles page by page (``_k_tile_by_slot``): asked for by the
    config's ``SLOT_TILES`` and possible when a page (a power of two) is no longer than ``BLOCK_N``."""
    return bool(cfg["SLOT_TILES"]) and cfg["BLOCK_N"] % page_size == 0


def score_candidates(q, k_cache, seqlens, page_indices, num_selected, alibi_slopes, page_size, alpha, scale,
                     cfg, splits, seg, softcap=0.0, row_start=None, block_table=None):
    """The K pass: ``(cand_z [B, Hq, splits*seg], cand_tok [B, Hkv, splits*seg], cand_cnt
    [B, Hkv, splits], split_max [B, Hq, splits])``, the scores ``z = (alpha-1) * scale * q.k``
    (soft-capped, ``(alpha-1) softcap tanh(s / softcap)``, when ``softcap > 0``) within 1 of their
    split's running max, compacted per split (see ``score_kernel``); rows below ``row_start[b]``
    (int ``[B]``, optional) are masked out. With ``block_table``, ``k_cache`` is a page pool
    (``runtime/paged.py``) read through the selected pages' blocks (:func:`selected_blocks`);
    candidates keep logical rows."""
    batch, hq, _, dim = q.shape
    hkv, capacity, k_strides = _cache_geometry(k_cache, page_size, block_table)
    cap = splits * seg
    dev = q.device
    cand_z = torch.empty((batch, hq, cap), device=dev, dtype=torch.float32)
    cand_tok = torch.empty((batch, hkv, cap), device=dev, dtype=torch.int32)
    cand_cnt = torch.empty((batch, hkv, splits), device=dev, dtype=torch.int32)
    split_max = torch.empty((batch, hq, splits), device=dev, dtype=torch.float32)
    # the splits' shared maxima (SHARE_EVERY > 0 only; otherwise never read: no fill launched)
    shared_max = torch.full((batch, hq), float("-inf"), device=dev, dtype=torch.float32) \
        if cfg["SHARE_EVERY"] > 0 else split_max
    has_alibi = alibi_slopes is not None
    slopes = alibi_slopes if has_alibi else q  # never read when has_alibi is False
    has_start = row_start is not None
    if block_table is None:
        block_args = (seqlens, 0, 0, 0, False)  # never read
    else:
        blocks = selected_blocks(page_indices, block_table)
        block_args = (blocks, *blocks.stride(), True)
    wrap_triton(score_kernel)[(batch * hkv, splits)](
        q, k_cache, seqlens, row_start if has_start else seqlens, page_indices, num_selected, slopes,
        cand_z, cand_tok, cand_cnt, split_max, shared_max,
        q.stride(0), q.stride(1), q.stride(3),
        *k_strides,
        page_indices.stride(0), page_indices.stride(1), page_indices.stride(2),
        num_selected.stride(0), num_selected.stride(1),
        hq, hkv, hq // hkv, dim, splits, seg, cfg["MIN_SPLIT_PAGES"], (alpha - 1.0) * scale, alpha - 1.0,
        capacity, (alpha - 1.0) * softcap if softcap else 1.0, *block_args, PAGE=page_size,
        HAS_ALIBI=has_alibi, SOFTCAP=bool(softcap), HAS_START=has_start, BLOCK_G=max(16, cm.next_pow2(hq // hkv)), BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=max(16, cm.next_pow2(dim)),
        DOT_PREC=cm.dot_precision(dev, q.dtype), UPCAST=cm.dot_upcast(dev, q.dtype),
        SHARE_EVERY=cfg["SHARE_EVERY"], SLOT_TILES=slot_tiles(cfg, page_size), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return cand_z, cand_tok, cand_cnt, split_max


def output_partials(v_cache, cand_z, cand_tok, cand_cnt, tau, live_z, alpha, cfg, page_size=1, block_table=None):
    """The V pass at the thresholds ``tau [B, Hq]``: per split the unnormalised ``sum p v``
    (``o_part [B, Hq, splits, D]``) and ``sum p`` (``l_part [B, Hq, splits]``) over the
    candidates above tau (``live_z [B*Hq, splits*seg]`` is scratch); with ``block_table``,
    ``v_cache`` is a page pool of blocks of ``page_size`` rows (``page_size`` is read only then)."""
    batch, hq, cap = cand_z.shape
    hkv, splits = cand_cnt.shape[1], cand_cnt.shape[2]
    dim = v_cache.shape[3]
    _, _, v_strides = _cache_geometry(v_cache, page_size, block_table)
    dev = v_cache.device
    live_tok = torch.empty((batch, hkv, cap), device=dev, dtype=torch.int32)
    o_part = torch.empty((batch, hq, splits, dim), device=dev, dtype=torch.float32)
    l_part = torch.empty((batch, hq, splits), device=dev, dtype=torch.float32)
    wrap_triton(output_kernel)[(batch * hkv, splits)](
        v_cache, cand_z, cand_tok, cand_cnt, tau, live_z, live_tok, o_part, l_part,
        *v_strides,
        hq, hkv, hq // hkv, dim, splits, cap // splits, 1.0 / (alpha - 1.0),
        # PAGE is read only through a table: without one, 1 keeps one variant for every page size
        *table_args(block_table, cand_cnt), PAGE=page_size if block_table is not None else 1,
        KIND=cm.alpha_kind(alpha), BLOCK_G=max(16, cm.next_pow2(hq // hkv)), BLOCK_T=cfg["BLOCK_T"],
        BLOCK_SCAN=8 * cfg["BLOCK_T"], BLOCK_D=max(16, cm.next_pow2(dim)),
        DOT_PREC=cm.exact_fp32_dot(dev), num_warps=cfg["out_warps"],
    )
    return o_part, l_part


@triton_op("entmaxkv::triton_paged_decode", mutates_args=())
def triton_paged_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    page_indices: Tensor,
    num_selected: Tensor,
    alibi_slopes: Optional[Tensor],
    page_size: int,
    alpha: float,
    scale: float,
    softcap: float = 0.0,
    row_start: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    read_all: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The registered op; positional ``alibi_slopes`` (custom ops take no kwarg-only tensors).
    Returns ``(out, tau, certified, delta)``, the last two as ``reference.decode_verdict`` says."""
    batch, hq, _, dim = q.shape
    hkv = _cache_geometry(k_cache, page_size, block_table)[0]
    cfg, splits, seg = plan_splits(q, page_indices, page_size, sparse=not read_all)
    cand_z, cand_tok, cand_cnt, split_max = score_candidates(
        q, k_cache, seqlens, page_indices, num_selected, alibi_slopes, page_size, alpha, scale, cfg, splits, seg,
        softcap, row_start, block_table)
    tau = torch.empty((batch, hq), device=q.device, dtype=torch.float32)
    live_z = solve_tau(cand_z, cand_cnt, split_max, tau, batch, hq, hkv, hq // hkv, splits, seg,
                       alpha, cfg)[0]
    o_part, l_part = output_partials(v_cache, cand_z, cand_tok, cand_cnt, tau, live_z, alpha, cfg,
                                     page_size, block_table)
    out = torch.empty((batch, hq, 1, dim), device=q.device, dtype=q.dtype)
    certified = torch.empty((batch, hq), device=q.device, dtype=torch.bool)
    delta = torch.empty((batch, hq), device=q.device, dtype=torch.float32)
    # A kernel of its own: folding this sum into the output pass's last program (an atomic
    # ticket) serialised the group's heads on one program and cost 4-14 us more on the H200.
    wrap_triton(reduce_kernel)[(batch * hq,)](
        o_part, l_part, tau, out, certified, delta, out.stride(0), out.stride(1), out.stride(3),
        hq, dim, splits, READ_ALL=bool(read_all), BLOCK_S=cm.next_pow2(splits),
        BLOCK_D=max(16, cm.next_pow2(dim)), num_warps=4,
    )
    return out, tau, certified, delta


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, page_indices: Tensor,
                 num_selected: Tensor, **geometry) -> tuple[Tensor, Tensor]:
    """Exact entmax attention of one query per sequence over the selected pages.

    Keyword arguments as :func:`paged_decode_verdict` (``page_size``, ``alpha``, ``scale``, and
    optionally ``alibi_slopes``, ``softcap``, ``row_start``, ``block_table``). Returns ``(out,
    tau)``: ``out`` [B, Hq, 1, D] in q's dtype, normalized by sum p, and ``tau`` float32 [B, Hq],
    the exact threshold over the selected tokens in z units. ``softcap > 0``: entmax over the
    capped scores ``softcap * tanh(s / softcap)``. ``row_start`` (int ``[B]``, optional):
    positions below ``row_start[b]`` are not attended (a left-padded prefix). ``block_table``
    (int32 ``[B, max_pages]``, optional): the caches are page pools ``[num_blocks, page_size,
    Hkv, D]`` addressed through it (``runtime/paged.py``); the page indices stay logical.
    """
    return paged_decode_verdict(q, k_cache, v_cache, seqlens, page_indices, num_selected, **geometry)[:2]


def paged_decode_verdict(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    page_indices: Tensor,
    num_selected: Tensor,
    *,
    page_size: int,
    alpha: float,
    scale: float,
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    row_start: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    read_all: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`paged_decode` plus ``(certified, delta)`` as ``reference.decode_verdict`` computes
    them from ``tau`` and ``read_all``, written by the decode's last kernel (the step's result needs
    them, and two small launches after the decode cost ~3 us on an H200 at short context)."""
    if block_table is None:
        check_decode_inputs(q, k_cache, v_cache, seqlens, page_indices, num_selected,
                            page_size=page_size, alpha=alpha, scale=scale, alibi_slopes=alibi_slopes)
    else:
        check_paged_decode_inputs(q, k_cache, v_cache, seqlens, block_table, page_size=page_size)
    return triton_paged_decode(q, k_cache, v_cache, seqlens, page_indices, num_selected,
                               alibi_slopes, int(page_size), float(alpha), float(scale), check_softcap(softcap),
                               check_row_start(row_start, q.shape[0], device=q.device), block_table,
                               bool(read_all))
