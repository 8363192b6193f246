"""Shape, dtype and device checks of the kernel launchers (metadata only: no host sync).

They turn bad input into a ``ValueError``/``TypeError`` naming the argument instead of a Triton
crash or a silent out-of-bounds read. Value checks (NaN, lengths past capacity) are the job of
``entmaxkv_compile.validation`` at the public entry points.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import check_alpha
from ._common import FLOAT_DTYPES

_INT_DTYPES = (torch.int32, torch.int64)


def _tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _same_device(name: str, x: Tensor, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like q, got {x.device}")


def check_page_size(page_size: object) -> int:
    """A page size is a positive power-of-two int."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be an int, got {type(page_size).__name__}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a positive power of two, got {page_size}")
    return page_size


def check_cache(name: str, cache: object, *, head_dim: Optional[int] = None) -> Tensor:
    """A KV buffer ``[B, Hkv, Nmax, D]`` of fp16/bf16/fp32 with unit stride over D."""
    cache = _tensor(name, cache)
    if cache.dim() != 4:
        raise ValueError(f"{name} must have shape [B, Hkv, Nmax, D], got {tuple(cache.shape)}")
    if cache.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {cache.dtype}")
    if head_dim is not None and cache.shape[3] != head_dim:
        raise ValueError(f"{name} must have head dim {head_dim}, got {cache.shape[3]}")
    return cache


def check_lengths(name: str, lengths: object, batch: int, device: torch.device) -> Tensor:
    """Per-sequence ints ``[B]`` on the data's device."""
    lengths = _tensor(name, lengths)
    if lengths.dtype not in _INT_DTYPES or tuple(lengths.shape) != (batch,):
        raise ValueError(
            f"{name} must be an int32/int64 tensor of shape [{batch}], "
            f"got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if lengths.device != device:
        raise ValueError(f"{name} must be on {device}, got {lengths.device}")
    return lengths


def check_stats(kmin: Tensor, kmax: Tensor, kmean: Optional[Tensor], km2: Optional[Tensor], *,
                shape: tuple[int, int, int, int], dtype: torch.dtype,
                device: torch.device) -> None:
    """Page-statistic buffers of ``shape`` ``[B, Hkv, Npages, D]``: kmin/kmax in the cache's
    ``dtype``, kmean/km2 both float32 or both ``dtype`` (compact moments; None skips a buffer),
    all on ``device``."""
    moment = (torch.float32, dtype)
    for name, buf, want in (("kmin", kmin, (dtype,)), ("kmax", kmax, (dtype,)),
                            ("kmean", kmean, moment), ("km2", km2, moment)):
        if buf is None:
            continue
        _tensor(name, buf)
        if tuple(buf.shape) != tuple(shape) or buf.dtype not in want:
            allowed = " or ".join(str(w) for w in dict.fromkeys(want))
            raise ValueError(f"{name} must be {allowed} of shape {list(shape)}, "
                             f"got {buf.dtype} {list(buf.shape)}")
        if buf.device != device:
            raise ValueError(f"{name} must be on {device}, got {buf.device}")
    if kmean is not None and km2 is not None and kmean.dtype != km2.dtype:
        raise ValueError(f"km2 must have kmean's dtype {kmean.dtype}, got {km2.dtype}")


def stats_shape(k_cache: Tensor, page_size: int) -> tuple[int, int, int, int]:
    """``[B, Hkv, ceil(Nmax / P), D]``, the stats shape of a cache."""
    batch, hkv, nmax, dim = k_cache.shape
    return batch, hkv, -(-nmax // page_size), dim


def check_query(q: object, k_cache: Tensor) -> Tensor:
    """q ``[B, Hq, 1, D]`` matching the cache's batch, head dim and dtype; ``Hq % Hkv == 0``."""
    q = _tensor("q", q)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must have shape [B, Hq, 1, D], got {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if q.dtype != k_cache.dtype:
        raise TypeError(f"q and the caches must share a dtype, got {q.dtype} and {k_cache.dtype}")
    if q.shape[0] != k_cache.shape[0] or q.shape[3] != k_cache.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)} "
                         "in batch or head dim")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of the cache's KV heads "
                         f"({k_cache.shape[1]})")
    _same_device("k_cache", k_cache, q)
    return q


def check_slopes(alibi_slopes: Optional[Tensor], q: Tensor) -> None:
    """ALiBi slopes: float ``[Hq]`` on q's device, or None."""
    if alibi_slopes is None:
        return
    _tensor("alibi_slopes", alibi_slopes)
    if tuple(alibi_slopes.shape) != (q.shape[1],) or not alibi_slopes.is_floating_point():
        raise ValueError(f"alibi_slopes must be a float tensor of shape [{q.shape[1]}], got "
                         f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
    _same_device("alibi_slopes", alibi_slopes, q)


def check_selection(page_indices: object, num_selected: object, k_cache: Tensor,
                    page_size: int, device: Optional[torch.device] = None) -> None:
    """``page_indices`` int32 ``[B, Hkv, Npages]`` and ``num_selected`` int32 ``[B, Hkv]``."""
    batch, hkv, nmax, _ = k_cache.shape
    npages = -(-nmax // page_size)
    page_indices = _tensor("page_indices", page_indices)
    num_selected = _tensor("num_selected", num_selected)
    if page_indices.dtype != torch.int32 or tuple(page_indices.shape) != (batch, hkv, npages):
        raise ValueError(f"page_indices must be int32 of shape [{batch}, {hkv}, {npages}], got "
                         f"{page_indices.dtype} {tuple(page_indices.shape)}")
    if num_selected.dtype != torch.int32 or tuple(num_selected.shape) != (batch, hkv):
        raise ValueError(f"num_selected must be int32 of shape [{batch}, {hkv}], got "
                         f"{num_selected.dtype} {tuple(num_selected.shape)}")
    device = k_cache.device if device is None else device
    for name, x in (("page_indices", page_indices), ("num_selected", num_selected)):
        if x.device != device:
            raise ValueError(f"{name} must be on {device}, got {x.device}")


def check_scalars(alpha: object, scale: object) -> None:
    """alpha > 1 and a finite float scale."""
    check_alpha(alpha)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
        raise TypeError(f"scale must be a finite float, got {scale!r}")


def check_decode_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor,
                        page_indices: Tensor, num_selected: Tensor, *, page_size: int,
                        alpha: float, scale: float, alibi_slopes: Optional[Tensor]) -> None:
    """All arguments of ``paged_decode``."""
    check_page_size(page_size)
    k_cache = check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache, head_dim=k_cache.shape[3])
    if v_cache.shape[:3] != k_cache.shape[:3] or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    q = check_query(q, k_cache)
    _same_device("v_cache", v_cache, q)
    check_lengths("seqlens", seqlens, q.shape[0], q.device)
    check_selection(page_indices, num_selected, k_cache, page_size)
    check_slopes(alibi_slopes, q)
    check_scalars(alpha, scale)
