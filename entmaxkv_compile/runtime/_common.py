"""Small helpers shared by the Triton launchers (block sizes, alpha fast paths, split counts) and
by the pure-torch prefills (the spans they walk a cache in).

Everything here is host-side arithmetic on *static* quantities (shapes, capacities, alpha), so a
launcher never reads tensor data on the host and never recompiles as a cache grows.
"""

from __future__ import annotations

import torch

# Alpha fast paths, passed to kernels as a constexpr: 0 = general power, 1 = sparsemax (alpha 2,
# beta 1), 2 = entmax15 (alpha 1.5, beta 2).
ALPHA_GENERAL = 0
ALPHA_SPARSEMAX = 1
ALPHA_ENTMAX15 = 2

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


REFERENCE_CHUNK_ELEMENTS = 1 << 25  # cache elements per piece of a reference prefill


def spans(count: int, elements_each: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(count)`` in pieces of at most
    ``REFERENCE_CHUNK_ELEMENTS`` elements (``elements_each`` per item, at least one item per
    piece): the pure-torch prefills walk a cache in these, so their float32 temporaries stay
    ~0.5 GB whatever the cache's size (a whole 8 x 1M-token cache in float32 is 32 GiB)."""
    step = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, elements_each))
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (and >= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-int(a) // int(b))


def integer_beta(alpha: float, largest: int = 4) -> int | None:
    """beta = 1/(alpha-1) when it is an integer in ``1..largest`` (alpha 2, 1.5, 4/3, 1.25): the
    closed-form paths of the gaussian estimate and of the certified tau; else None."""
    beta = 1.0 / (alpha - 1.0)
    rounded = round(beta)
    return rounded if 1 <= rounded <= largest and abs(beta - rounded) < 1e-9 else None


def alpha_kind(alpha: float) -> int:
    """The constexpr fast-path id of an entmax alpha (see ALPHA_* above)."""
    if alpha == 2.0:
        return ALPHA_SPARSEMAX
    if alpha == 1.5:
        return ALPHA_ENTMAX15
    return ALPHA_GENERAL


def dot_upcast(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether tl.dot operands must be upcast to fp32: the CPU interpreter's bf16 dot is wrong."""
    return device.type != "cuda" and dtype == torch.bfloat16


def dot_precision(device: torch.device, dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32 operands, tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 or dot_upcast(device, dtype) else "tf32"


def exact_fp32_dot(device: torch.device) -> str:
    """tl.dot precision for fp32 operands that must stay fp32-accurate: three tf32 passes on a
    GPU (tensor cores, no register-hungry FMA path), plain fp32 in the interpreter."""
    return "tf32x3" if device.type == "cuda" else "ieee"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small constant for the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def decode_splits(batch: int, kv_heads: int, num_pages: int, device: torch.device,
                  programs_per_sm: int = 8, max_splits: int = 256) -> int:
    """Split-K factor of the decode kernels, from static sizes only (capacity, not lengths).

    Sized so that the K pass's grid (batch x KV heads x splits) is about ``programs_per_sm``
    programs per multiprocessor (a tuned launch parameter: a grid that ends in a part-filled
    wave leaves multiprocessors idle for a whole program's time), never more splits than pages.
    """
    want = cdiv(programs_per_sm * sm_count(device), max(1, batch * kv_heads))
    return max(1, min(max_splits, num_pages, want))
