"""The one validation module: every check of an argument lives here, once.

Two tiers. The public checks (``check_decode_inputs``, ``check_stats_buffers``, ...) state the
contract of the public API and of the pure-torch references. The launcher checks at the end
(``check_kernel_*``) add what the Triton launchers need on top (fp16/bf16/fp32 only, q in the
cache's dtype, int32 page tables), so bad input becomes an error naming the argument instead of
a Triton crash or a silent out-of-bounds read. Both tiers share the helpers at the top.

Shape, dtype and device checks read only metadata and never synchronise. Checks that must look at
values (NaN in ``q``, lengths beyond the cache capacity, positions out of range) synchronise with
the device, so each takes ``check_values``: the eager API keeps the default ``True``, the compiled
path passes ``False``. Every error names the argument and says what was expected.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .config import check_alpha

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
# What the Triton launchers compute in (float64 stays on the reference: it is the exactness path).
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` must be a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    """``tensor`` must be fp16, bf16, fp32 or fp64."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in {FLOAT_DTYPES}, got {tensor.dtype}")


def check_int_dtype(name: str, tensor: torch.Tensor) -> None:
    """``tensor`` must be int32 or int64."""
    if tensor.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {tensor.dtype}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` must live on ``reference``'s device."""
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{name} must be on the same device as {reference_name} ({reference.device}), "
                f"got {tensor.device}"
            )


def check_page_size(page_size: Any) -> int:
    """``page_size`` must be a positive power-of-two int."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be an int, got {type(page_size).__name__}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a positive power of two, got {page_size}")
    return page_size


def check_scale(scale: Any) -> float:
    """``scale`` must be a finite positive Python number (the Quest bound assumes scale > 0)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale > 0.0 and scale != float("inf")):
        raise ValueError(f"scale must be a finite float > 0, got {scale}")
    return scale


def check_softcap(softcap: Any) -> float:
    """``softcap`` (the logit soft-cap ``c = cap * tanh(s / cap)``) must be a finite Python number
    >= 0; 0 means no cap."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0.0 = no cap), got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (softcap >= 0.0 and softcap != float("inf")):
        raise ValueError(f"softcap must be a finite float >= 0 (0.0 = no cap), got {softcap}")
    return softcap


def check_kv_cache(name: str, cache: torch.Tensor) -> None:
    """A KV cache is a floating ``[B, Hkv, Nmax, D]`` tensor with non-empty dimensions."""
    check_tensor(name, cache)
    if cache.dim() != 4:
        raise ValueError(f"{name} must have shape [B, Hkv, Nmax, D], got {tuple(cache.shape)}")
    if min(cache.shape) < 1:
        raise ValueError(f"{name} must have non-empty dimensions, got {tuple(cache.shape)}")
    check_float_dtype(name, cache)


def has_values(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s values can be read: not a meta tensor, not a fake tensor traced by
    torch.compile/export. Value checks are skipped (not failed) on tensors without values."""
    if tensor.device.type == "meta" or torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(tensor)


def check_lengths(name: str, lengths: Any, batch: int, *, device: torch.device) -> torch.Tensor:
    """``lengths`` is an int ``[B]`` tensor on ``device`` (per-sequence lengths or positions)."""
    check_tensor(name, lengths)
    check_int_dtype(name, lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"{name} must be on device {device}, got {lengths.device}")
    return lengths


def check_row_start(row_start: Any, batch: int, *, device: torch.device) -> Optional[torch.Tensor]:
    """``row_start`` (a per-sequence first attended position) is None or an int ``[B]`` tensor on
    ``device``. Values are not checked (no sync): a start <= 0 attends from the first row, a start
    >= the length leaves nothing to attend (``out = 0``, ``tau = +inf``, never certified)."""
    if row_start is None:
        return None
    return check_lengths("row_start", row_start, batch, device=device)


def check_seqlens(
    seqlens: Any, batch: int, max_seqlen: int, *, device: torch.device, check_values: bool = True
) -> None:
    """``seqlens`` is an int ``[B]`` tensor with ``1 <= seqlens <= max_seqlen`` (value check syncs)."""
    check_lengths("seqlens", seqlens, batch, device=device)
    if check_values and batch > 0 and has_values(seqlens):
        lo, hi = int(seqlens.min()), int(seqlens.max())
        if lo < 1 or hi > max_seqlen:
            raise ValueError(
                f"seqlens must lie in [1, {max_seqlen}] (the cache capacity Nmax), got values in [{lo}, {hi}]"
            )


def check_positions(
    positions: Any, batch: int, max_seqlen: int, *, device: torch.device, check_values: bool = True
) -> None:
    """``positions`` is an int ``[B]`` tensor with ``0 <= positions < max_seqlen`` (value check syncs)."""
    check_lengths("positions", positions, batch, device=device)
    if check_values and batch > 0 and has_values(positions):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= max_seqlen:
            raise ValueError(f"positions must lie in [0, {max_seqlen - 1}], got values in [{lo}, {hi}]")


def check_alibi_slopes(alibi_slopes: Any, num_q_heads: int, *, device: torch.device) -> None:
    """``alibi_slopes`` is ``None`` or a floating ``[Hq]`` tensor on ``device``."""
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes)
    check_float_dtype("alibi_slopes", alibi_slopes)
    if alibi_slopes.shape != (num_q_heads,):
        raise ValueError(
            f"alibi_slopes must have shape [Hq] = [{num_q_heads}], got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on device {device}, got {alibi_slopes.device}")


def check_decode_inputs(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    seqlens: Any,
    alibi_slopes: Any = None,
    *,
    check_values: bool = True,
) -> None:
    """Check one decode step's inputs against the tensor conventions of docs/ARCHITECTURE.md.

    ``q`` ``[B, Hq, 1, D]``; ``k_cache``/``v_cache`` ``[B, Hkv, Nmax, D]`` of one shape with
    ``Hq % Hkv == 0``; floating dtypes; one device; ``seqlens`` int ``[B]`` in ``[1, Nmax]``;
    ``alibi_slopes`` ``None`` or float ``[Hq]``. With ``check_values`` also rejects NaN/inf in ``q`` and ``alibi_slopes``
    and out-of-range ``seqlens`` (both synchronise).
    """
    check_decode_query(q)
    check_kv_cache("k_cache", k_cache)
    check_kv_cache("v_cache", v_cache)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    batch, q_heads, _, head_dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache must have shape [B={batch}, Hkv, Nmax, D={head_dim}] to match q, "
            f"got {tuple(k_cache.shape)}"
        )
    kv_heads = k_cache.shape[1]
    if q_heads % kv_heads:
        raise ValueError(
            f"q heads ({q_heads}) must be a multiple of k_cache heads ({kv_heads}) for GQA"
        )
    check_same_device("q", q, k_cache=k_cache, v_cache=v_cache)
    check_seqlens(seqlens, batch, k_cache.shape[2], device=q.device, check_values=check_values)
    check_alibi_slopes(alibi_slopes, q_heads, device=q.device)
    if check_values and has_values(q):
        if not bool(torch.isfinite(q).all()):
            raise ValueError("q must be finite, but it contains NaN or inf")
        if alibi_slopes is not None and not bool(torch.isfinite(alibi_slopes).all()):
            raise ValueError("alibi_slopes must be finite, but they contain NaN or inf")


def check_stats_buffers(
    kmin: Any, kmax: Any, kmean: Any, km2: Any, *, batch: int, kv_heads: int, num_pages: int, head_dim: int
) -> None:
    """The four page-statistics buffers: ``[B, Hkv, Npages, D]``; kmin/kmax one floating dtype
    (K's); kmean/km2 one dtype, float32 (exact Welford) or kmin's (compact moments, see
    ``EntmaxKVConfig.moment_dtype``)."""
    expected = (batch, kv_heads, num_pages, head_dim)
    for name, buf in (("kmin", kmin), ("kmax", kmax), ("kmean", kmean), ("km2", km2)):
        check_tensor(name, buf)
        check_float_dtype(name, buf)
        if tuple(buf.shape) != expected:
            raise ValueError(f"{name} must have shape [B, Hkv, Npages, D] = {list(expected)}, got {tuple(buf.shape)}")
    if kmax.dtype != kmin.dtype:
        raise TypeError(f"kmax must have the dtype of kmin ({kmin.dtype}), got {kmax.dtype}")
    for name, buf in (("kmean", kmean), ("km2", km2)):
        if buf.dtype not in (torch.float32, kmin.dtype):
            raise TypeError(f"{name} must be float32 or kmin's dtype {kmin.dtype}, got {buf.dtype}")
    if km2.dtype != kmean.dtype:
        raise TypeError(f"km2 must have the dtype of kmean ({kmean.dtype}), got {km2.dtype}")
    check_same_device("kmin", kmin, kmax=kmax, kmean=kmean, km2=km2)


def check_decode_query(q: Any) -> None:
    """``q`` is a floating tensor ``[B, Hq, 1, D]``: one decode query per sequence and head."""
    check_tensor("q", q)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must have shape [B, Hq, 1, D] (one decode query), got {tuple(q.shape)}")
    check_float_dtype("q", q)


def check_stats_valid(stats_valid: Any, batch: int, device: torch.device) -> None:
    """``stats_valid`` is None or a bool ``[B]`` tensor on ``device`` (see ``KVPageStats.valid_for``)."""
    if stats_valid is None:
        return
    check_tensor("stats_valid", stats_valid)
    if stats_valid.dtype != torch.bool or tuple(stats_valid.shape) != (batch,):
        raise ValueError(f"stats_valid must be a bool tensor of shape [B] = [{batch}], got "
                         f"{stats_valid.dtype} {tuple(stats_valid.shape)}")
    if stats_valid.device != device:
        raise ValueError(f"stats_valid must be on device {device}, got {stats_valid.device}")


def num_pages_for(max_seqlen: int, page_size: int) -> int:
    """Page capacity ``ceil(max_seqlen / page_size)``."""
    return -(-max_seqlen // page_size)


def check_int_arg(name: str, value: Any, *, minimum: int = 0) -> int:
    """``value`` must be a Python int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_page_table(
    page_indices: Any, num_selected: Any, *, batch: int, kv_heads: int, num_pages: int, device: torch.device
) -> None:
    """A selection: int ``page_indices [B, Hkv, Npages]`` and int ``num_selected [B, Hkv]``."""
    check_tensor("page_indices", page_indices)
    check_tensor("num_selected", num_selected)
    check_int_dtype("page_indices", page_indices)
    check_int_dtype("num_selected", num_selected)
    if tuple(page_indices.shape) != (batch, kv_heads, num_pages):
        raise ValueError(
            f"page_indices must have shape [B, Hkv, Npages] = {[batch, kv_heads, num_pages]}, "
            f"got {tuple(page_indices.shape)}"
        )
    if tuple(num_selected.shape) != (batch, kv_heads):
        raise ValueError(
            f"num_selected must have shape [B, Hkv] = {[batch, kv_heads]}, got {tuple(num_selected.shape)}"
        )
    for name, tensor in (("page_indices", page_indices), ("num_selected", num_selected)):
        if tensor.device != device:
            raise ValueError(f"{name} must be on device {device}, got {tensor.device}")


def check_bound_inputs(q: Any, kmin: Any, kmax: Any, seqlens: Any, page_size: Any, scale: Any,
                       alibi_slopes: Any) -> tuple[int, float]:
    """Metadata checks (no sync) of the inputs of a Quest bound; returns ``(page_size, scale)``."""
    check_decode_query(q)
    page_size = check_page_size(page_size)
    scale = check_scale(scale)
    check_tensor("kmin", kmin)
    if kmin.dim() != 4:
        raise ValueError(f"kmin must have shape [B, Hkv, Npages, D], got {tuple(kmin.shape)}")
    batch, q_heads, _, head_dim = q.shape
    kv_heads, num_pages = kmin.shape[1], kmin.shape[2]
    if kmin.shape[0] != batch or kmin.shape[3] != head_dim:
        raise ValueError(f"kmin must have shape [B={batch}, Hkv, Npages, D={head_dim}], got {tuple(kmin.shape)}")
    if q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of the stats' KV heads ({kv_heads})")
    check_tensor("kmax", kmax)
    if kmax.shape != kmin.shape or kmax.dtype != kmin.dtype:
        raise ValueError(f"kmax must match kmin's shape {tuple(kmin.shape)} and dtype {kmin.dtype}")
    check_float_dtype("kmin", kmin)
    for name, tensor in (("kmin", kmin), ("kmax", kmax)):
        if tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {tensor.device}")
    check_seqlens(seqlens, batch, num_pages * page_size, device=q.device, check_values=False)
    check_alibi_slopes(alibi_slopes, q_heads, device=q.device)
    return page_size, scale


def check_attend_inputs(q: Any, k_cache: Any, v_cache: Any, seqlens: Any, page_size: Any, alpha: Any,
                        scale: Any, alibi_slopes: Any) -> tuple[int, float, float]:
    """Metadata checks (no sync) of an attend step's inputs; returns ``(page_size, alpha, scale)``."""
    check_decode_inputs(q, k_cache, v_cache, seqlens, alibi_slopes, check_values=False)
    return check_page_size(page_size), check_alpha(alpha), check_scale(scale)


def check_tau(tau: Any, q: torch.Tensor) -> None:
    """``tau`` is a float ``[B, Hq]`` tensor (one threshold per query head)."""
    check_tensor("tau", tau)
    if tuple(tau.shape) != tuple(q.shape[:2]) or not tau.dtype.is_floating_point:
        raise ValueError(f"tau must be a float tensor of shape [B, Hq] = {list(q.shape[:2])}, got "
                         f"{tau.dtype} {tuple(tau.shape)}")

def check_step_inputs(q: Any, k_cache: Any, v_cache: Any, seqlens: Any, stats: Sequence[Any], *, page_size: Any,
                      alpha: Any, scale: Any, alibi_slopes: Any) -> None:
    """Metadata checks (no sync) of one whole decode step: the decode inputs, the four page
    statistics ``(kmin, kmax, kmean, km2)`` of that cache, page size, alpha and scale."""
    page_size, _, _ = check_attend_inputs(q, k_cache, v_cache, seqlens, page_size, alpha, scale, alibi_slopes)
    batch, kv_heads, max_seqlen, head_dim = k_cache.shape
    check_stats_buffers(*stats, batch=batch, kv_heads=kv_heads, num_pages=num_pages_for(max_seqlen, page_size),
                        head_dim=head_dim)

# ------------------------------------------------------------------------- the launchers' demands


def check_kernel_cache(name: str, cache: Any) -> torch.Tensor:
    """A KV buffer the kernels can read: ``[B, Hkv, Nmax, D]`` of fp16/bf16/fp32."""
    check_kv_cache(name, cache)
    if cache.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 for the Triton kernels, got {cache.dtype}")
    return cache


def stats_shape(k_cache: torch.Tensor, page_size: int) -> tuple[int, int, int, int]:
    """``[B, Hkv, ceil(Nmax / P), D]``, the stats shape of a cache."""
    batch, hkv, nmax, dim = k_cache.shape
    return batch, hkv, num_pages_for(nmax, page_size), dim


def check_kernel_stats(kmin: torch.Tensor, kmax: torch.Tensor, kmean: Optional[torch.Tensor],
                       km2: Optional[torch.Tensor], *, shape: tuple[int, int, int, int], dtype: torch.dtype,
                       device: torch.device) -> None:
    """Page-statistic buffers of ``shape`` ``[B, Hkv, Npages, D]``: kmin/kmax in the cache's
    ``dtype``, kmean/km2 both float32 or both ``dtype`` (compact moments; None skips a buffer),
    all on ``device``."""
    moment = (torch.float32, dtype)
    for name, buf, want in (("kmin", kmin, (dtype,)), ("kmax", kmax, (dtype,)),
                            ("kmean", kmean, moment), ("km2", km2, moment)):
        if buf is None:
            continue
        check_tensor(name, buf)
        if tuple(buf.shape) != tuple(shape) or buf.dtype not in want:
            allowed = " or ".join(str(w) for w in dict.fromkeys(want))
            raise ValueError(f"{name} must be {allowed} of shape {list(shape)}, "
                             f"got {buf.dtype} {list(buf.shape)}")
        if buf.device != device:
            raise ValueError(f"{name} must be on {device}, got {buf.device}")
    if kmean is not None and km2 is not None and kmean.dtype != km2.dtype:
        raise ValueError(f"km2 must have kmean's dtype {kmean.dtype}, got {km2.dtype}")


def check_kernel_query(q: Any, k_cache: torch.Tensor) -> torch.Tensor:
    """q ``[B, Hq, 1, D]`` in the cache's dtype (fp16/bf16/fp32), matching its batch and head dim,
    on its device; ``Hq % Hkv == 0``."""
    check_tensor("q", q)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must have shape [B, Hq, 1, D], got {tuple(q.shape)}")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if q.dtype != k_cache.dtype:
        raise TypeError(f"q and the caches must share a dtype, got {q.dtype} and {k_cache.dtype}")
    if q.shape[0] != k_cache.shape[0] or q.shape[3] != k_cache.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)} "
                         "in batch or head dim")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of the cache's KV heads "
                         f"({k_cache.shape[1]})")
    check_same_device("q", q, k_cache=k_cache)
    return q


def check_kernel_page_table(page_indices: Any, num_selected: Any, *, batch: int, kv_heads: int,
                            num_pages: int, device: torch.device) -> None:
    """A selection as the kernels read it: :func:`check_page_table`, in int32."""
    check_page_table(page_indices, num_selected, batch=batch, kv_heads=kv_heads, num_pages=num_pages,
                     device=device)
    for name, tensor in (("page_indices", page_indices), ("num_selected", num_selected)):
        if tensor.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 for the Triton kernels, got {tensor.dtype}")


def check_kernel_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               seqlens: torch.Tensor, page_indices: torch.Tensor, num_selected: torch.Tensor,
                               *, page_size: int, alpha: float, scale: float,
                               alibi_slopes: Optional[torch.Tensor]) -> None:
    """All arguments of the fused decode launcher (metadata only)."""
    check_page_size(page_size)
    check_kernel_cache("k_cache", k_cache)
    check_kernel_cache("v_cache", v_cache)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    q = check_kernel_query(q, k_cache)
    check_same_device("q", q, v_cache=v_cache)
    batch, kv_heads, max_seqlen, _ = k_cache.shape
    check_lengths("seqlens", seqlens, batch, device=q.device)
    check_kernel_page_table(page_indices, num_selected, batch=batch, kv_heads=kv_heads,
                            num_pages=num_pages_for(max_seqlen, page_size), device=q.device)
    check_alibi_slopes(alibi_slopes, q.shape[1], device=q.device)
    check_alpha(alpha)
    check_scale(scale)


def check_kernel_bound_inputs(q: Any, kmin: Any, kmax: Any, kmean: Optional[torch.Tensor],
                              km2: Optional[torch.Tensor], seqlens: Any, *, page_size: int, alpha: float,
                              scale: float, alibi_slopes: Optional[torch.Tensor]) -> torch.Tensor:
    """The arguments the scoring launchers share (selection, Quest bounds, certificate): the stat
    buffers agree with kmin's shape, dtype and device, q matches them. Returns q."""
    check_page_size(page_size)
    if not isinstance(kmin, torch.Tensor) or kmin.dim() != 4:
        raise ValueError("kmin must be a [B, Hkv, Npages, D] tensor")
    check_kernel_stats(kmin, kmax, kmean, km2, shape=tuple(kmin.shape), dtype=kmin.dtype, device=kmin.device)
    q = check_kernel_query(q, kmin)
    check_lengths("seqlens", seqlens, q.shape[0], device=q.device)
    check_alibi_slopes(alibi_slopes, q.shape[1], device=q.device)
    check_alpha(alpha)
    check_scale(scale)
    return q


# ------------------------------------------------------------------ the token-level key sketch

SKETCH_GROUP = 32  # channels per int8 group of the key sketch (one absmax scale each)


def sketch_groups(head_dim: int) -> int:
    """Scale groups per token of the key sketch: ``ceil(head_dim / 32)`` (a short last group)."""
    return -(-int(head_dim) // SKETCH_GROUP)


def check_sketch_buffers(codes: Any, scales: Any, *, batch: Optional[int] = None,
                         kv_heads: Optional[int] = None, capacity: Optional[int] = None,
                         head_dim: Optional[int] = None) -> None:
    """The key sketch: int8 ``codes [B, Hkv, Nmax, D]`` and bfloat16 ``scales [B, Hkv, Nmax,
    ceil(D/32)]`` on one device; each given size must match."""
    check_tensor("codes", codes)
    check_tensor("scales", scales)
    if codes.dim() != 4 or codes.dtype != torch.int8:
        raise ValueError(f"codes must be an int8 tensor [B, Hkv, Nmax, D], got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    for name, want, got in (("batch", batch, codes.shape[0]), ("kv_heads", kv_heads, codes.shape[1]),
                            ("capacity", capacity, codes.shape[2]), ("head_dim", head_dim, codes.shape[3])):
        if want is not None and want != got:
            raise ValueError(f"codes must have {name} {want} (shape [B, Hkv, Nmax, D]), got "
                             f"{tuple(codes.shape)}")
    expected = (*codes.shape[:3], sketch_groups(codes.shape[3]))
    if tuple(scales.shape) != expected or scales.dtype != torch.bfloat16:
        raise ValueError(f"scales must be a bfloat16 tensor of shape [B, Hkv, Nmax, ceil(D/32)] = "
                         f"{list(expected)}, got {scales.dtype} {tuple(scales.shape)}")
    check_same_device("codes", codes, scales=scales)


def check_sketch_bound_inputs(q: Any, codes: Any, scales: Any, seqlens: Any, candidates: Any,
                              page_size: Any, scale: Any, alibi_slopes: Any) -> tuple[int, float]:
    """Metadata checks (no sync) of a sketch page bound: q ``[B, Hq, 1, D]`` floating, the sketch
    of that batch and head dim with ``Hq % Hkv == 0``, int ``seqlens [B]``, bool ``candidates
    [B, Hkv, ceil(Nmax / P)]``, all on one device. Returns ``(page_size, scale)``."""
    check_decode_query(q)
    page_size = check_page_size(page_size)
    scale = check_scale(scale)
    batch, q_heads, _, head_dim = q.shape
    check_sketch_buffers(codes, scales, batch=batch, head_dim=head_dim)
    kv_heads, capacity = codes.shape[1], codes.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of the sketch's KV heads ({kv_heads})")
    check_same_device("q", q, codes=codes)
    check_lengths("seqlens", seqlens, batch, device=q.device)
    check_tensor("candidates", candidates)
    expected = (batch, kv_heads, num_pages_for(capacity, page_size))
    if candidates.dtype != torch.bool or tuple(candidates.shape) != expected:
        raise ValueError(f"candidates must be a bool tensor of shape [B, Hkv, Npages] = {list(expected)}, "
                         f"got {candidates.dtype} {tuple(candidates.shape)}")
    check_same_device("q", q, candidates=candidates)
    check_alibi_slopes(alibi_slopes, q_heads, device=q.device)
    return page_size, scale
