"""How the decode benchmark times a step: CUDA-graph capture, medians, the SDPA baselines.

On a GPU a step is captured in a CUDA graph after a warm-up (so Triton compilation and the
caching allocator are out of the way) and its replay is timed by ``triton.testing.do_bench``
(median; do_bench flushes L2 between calls). If capture fails the step is timed eagerly and the
failure is returned as a note. On CPU (the smoke preset) the median wall time of a few eager
calls is reported: a plumbing check, not a performance number.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["bench", "capture", "copy_bandwidth", "sdpa_step"]


def capture(fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], Any], Any, str | None]:
    """``(replay, result, note)``: ``fn`` captured in a CUDA graph (``result`` is the graph's
    output, refreshed by each replay), or ``fn`` itself with the capture error as ``note``."""
    if device.type != "cuda":
        return fn, fn(), None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            result = fn()
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager timing
        del graph
        torch.cuda.synchronize()
        note = f"graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); eager timing"
        return fn, fn(), note
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, result, None


def bench(fn: Callable[[], Any], device: torch.device, cpu_reps: int = 2) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU, wall time on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sdpa_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> tuple[Callable[[], Any], str | None]:
    """A softmax decode step on one SDPA backend (``"flash"`` or ``"cudnn"``), and a note.

    Tries ``enable_gqa``; if the backend refuses it, packs the G query heads of a KV head as G
    query rows (``[B, Hkv, G, D]``, no mask: the same math, K and V read once). Raises
    ``RuntimeError`` when the backend cannot run these inputs at all.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    if backend == "cudnn" and not (q.is_cuda and torch.backends.cudnn.is_available()):
        raise RuntimeError(f"SDPA cudnn unavailable on {q.device.type}")
    batch, hq, _, dim = q.shape
    hkv = k.shape[1]
    attention = torch.nn.functional.scaled_dot_product_attention

    def gqa():
        with sdpa_kernel(sdp):
            return attention(q, k, v, enable_gqa=hq != hkv)

    def packed():
        with sdpa_kernel(sdp):
            out = attention(q.reshape(batch, hkv, hq // hkv, dim), k, v)
        return out.reshape(batch, hq, 1, dim)

    errors = []
    for name, fn in (("enable_gqa", gqa), ("packed", packed)):
        try:
            fn()
            if q.is_cuda:
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - try the next spelling, report both if none runs
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        return fn, (None if name == "enable_gqa" else "GQA packed as query rows")
    raise RuntimeError(f"SDPA {backend} unavailable ({'; '.join(errors)})")


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy of 1 GiB, read + write GB/s (None on CPU)."""
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), device)
    del x, y
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / ms / 1e6
