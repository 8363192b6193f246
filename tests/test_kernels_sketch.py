"""The int8 key sketch kernels (``runtime/sketch/kernel.py``) against the reference
``runtime/sketch/reference.py``: codes and scales bit for bit, page bounds to float32 rounding
and, like the reference, never below the float64 page max.

CPU: Triton interpreter, tiny shapes. ``ENTMAXKV_KERNEL_TEST_DEVICE=cuda``: compiled, real shapes.
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE
from conftest import KERNEL_REAL_SHAPES as REAL
from test_sketch import all_pages, check_valid, sketch_case, true_page_max

from entmaxkv_compile.runtime.sketch import kernel
from entmaxkv_compile.runtime.sketch import reference

pytestmark = pytest.mark.kernels

NMAX = 4093 if REAL else 75


def _same_scales(a, b):
    """Bitwise equal bfloat16 scales, any NaN equal to any NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


def _kernel_sketch(k, seqlens):
    sketch = reference.KeySketch.allocate(*k.shape, dtype=k.dtype, device=k.device)
    kernel.sketch_prefill_(k, seqlens, *sketch.buffers())
    return sketch


@pytest.mark.parametrize("dtype, dim, family", [
    (torch.float16, 16, "iid"), (torch.bfloat16, 48, "student_t"), (torch.float32, 80, "offset"),
    (torch.float32, 64, "planted"),
])
def test_prefill_and_append_match_reference(dtype, dim, family):
    _, k, seqlens, _ = sketch_case(family, seed=dim, nmax=NMAX, dim=dim, dtype=dtype, device=DEVICE)
    k[0, 1, 7, 3] = float("nan")
    k[1, 0, 2, 1] = float("inf")
    k[0, 0, 9] = 0.0
    k[1, 1, NMAX - 1] = float("nan")  # past sequence 1's length: never quantised
    short = (seqlens - 6).clamp(min=1)
    ref = reference.KeySketch.from_cache(k, short)
    got = _kernel_sketch(k, short)
    assert torch.equal(ref.codes, got.codes) and _same_scales(ref.scales, got.scales)
    for step in range(6):
        pos = short + step
        ref.append(k, pos)
        kernel.sketch_append_(k, pos, *got.buffers())
    assert torch.equal(ref.codes, got.codes) and _same_scales(ref.scales, got.scales)
    fresh = reference.KeySketch.from_cache(k, short + 6)
    assert torch.equal(fresh.codes, got.codes) and _same_scales(fresh.scales, got.scales)


def test_append_outside_the_cache_writes_nothing():
    _, k, seqlens, _ = sketch_case("iid", seed=1, nmax=NMAX, device=DEVICE)
    got = _kernel_sketch(k, seqlens)
    codes, scales = got.codes.clone(), got.scales.clone()
    kernel.sketch_append_(k, torch.tensor([NMAX, -1], dtype=torch.int32, device=DEVICE), *got.buffers())
    assert torch.equal(codes, got.codes) and torch.equal(scales, got.scales)


@pytest.mark.parametrize("family, dtype, dim, gqa, alibi, page", [
    ("iid", torch.float16, 16, 1, False, 16),
    ("planted", torch.bfloat16, 48, 4, True, 16),
    ("student_t", torch.float32, 64, 4, False, 8),
    ("offset", torch.float32, 80, 1, True, 16),
    ("offset", torch.float16, 48, 4, False, 32),
])
def test_page_bounds_match_reference_and_are_valid(family, dtype, dim, gqa, alibi, page):
    hkv = 8 if REAL else 2
    q, k, seqlens, slopes = sketch_case(family, seed=dim + page, hq=hkv * gqa, hkv=hkv, nmax=NMAX,
                                        dim=dim, page=page, dtype=dtype, alibi=alibi, device=DEVICE)
    sketch = reference.KeySketch.from_cache(k, seqlens)
    gen = torch.Generator().manual_seed(dim)
    cand = (torch.rand(*all_pages(sketch.codes, page).shape, generator=gen) < 0.7).to(DEVICE)
    scale = 1 / math.sqrt(dim)
    kw = dict(page_size=page, scale=scale, alibi_slopes=slopes)
    ref = reference.sketch_page_bounds(q, *sketch.buffers(), seqlens, cand, **kw)
    got = kernel.sketch_page_bounds(q, *sketch.buffers(), seqlens, cand, **kw)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(ref == float("-inf"), got == float("-inf"))
    finite = torch.isfinite(ref)
    assert bool(finite.any()) and torch.equal(finite, torch.isfinite(got))
    # float32 sums in another order: the difference scales with the largest term, not with the
    # bound itself (offset keys cancel to small bounds); validity is checked exactly below
    tol = 1e-5 + 4e-6 * float(ref[finite].abs().max())
    assert float((got[finite] - ref[finite]).abs().max()) <= tol
    full = kernel.sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, page), **kw)
    check_valid(full, true_page_max(q, k, seqlens, page, scale, slopes))


def test_page_bounds_of_non_finite_keys_and_garbage_past_the_length():
    q, k, seqlens, _ = sketch_case("iid", seed=2, nmax=NMAX, device=DEVICE)
    k[0, 1, 21, 5] = float("nan")  # page 1 of KV head 1: query heads 4..7
    k[0, 0, 40, 0] = float("inf")  # page 2 of KV head 0: query heads 0..3
    sketch = reference.KeySketch.from_cache(k, seqlens)
    length = int(seqlens[1])
    sketch.scales[1, :, length:] = float("nan")  # garbage that must never be read
    cand = all_pages(sketch.codes, 16)
    cand[0, 0, 3] = False
    got = kernel.sketch_page_bounds(q, *sketch.buffers(), seqlens, cand, page_size=16, scale=0.2)
    for hit in (got[0, 4:, 1], got[0, :4, 2]):
        assert bool((hit.isnan() | (hit == float("inf"))).all()), hit
    assert bool((got[0, :4, 3] == float("-inf")).all())
    rest = got[1][:, : -(-length // 16)]
    assert bool(torch.isfinite(rest).all())
    assert bool((got[1][:, -(-length // 16):] == float("-inf")).all())


def _page_mask(idx, nsel, num_pages):
    """bool ``[B, Hkv, Np]`` of a compacted selection."""
    slots = torch.arange(idx.shape[-1], device=idx.device)
    mask = torch.zeros(*idx.shape[:2], num_pages + 1, dtype=torch.bool, device=idx.device)
    chosen = torch.where(slots < nsel[..., None], idx.long(), num_pages)
    return mask.scatter_(2, chosen, True)[..., :num_pages]


@pytest.mark.parametrize("family, dtype, dim, gqa, alibi, page, alpha", [
    ("planted", torch.float16, 48, 4, False, 16, 1.5),
    ("iid", torch.bfloat16, 16, 1, True, 16, 2.0),
    ("student_t", torch.float32, 80, 4, False, 8, 1.25),
    ("offset", torch.float32, 64, 1, True, 16, 4 / 3),
    ("planted", torch.float32, 64, 2, False, 32, 1.75),
])
def test_selection_matches_reference_and_keeps_the_support(family, dtype, dim, gqa, alibi, page, alpha):
    from entmaxkv_compile.math.reference import entmax_threshold

    hkv = 8 if REAL else 2
    q, k, seqlens, slopes = sketch_case(family, seed=3 * dim + page, hq=hkv * gqa, hkv=hkv, nmax=NMAX,
                                        dim=dim, page=page, dtype=dtype, alibi=alibi, device=DEVICE)
    sketch = reference.KeySketch.from_cache(k, seqlens)
    scale = 1 / math.sqrt(dim)
    kw = dict(page_size=page, alpha=alpha, scale=scale, alibi_slopes=slopes)
    for read_all in (torch.zeros(2, dtype=torch.bool), torch.tensor([False, True])):
        read_all = read_all.to(DEVICE)
        ref_idx, ref_n, ref_floor = reference.sketch_select(q, *sketch.buffers(), seqlens, read_all, **kw)
        idx, nsel, floor = kernel.sketch_select(q, *sketch.buffers(), seqlens, read_all, **kw)
        assert torch.equal(torch.isfinite(floor), torch.isfinite(ref_floor))
        fin = torch.isfinite(ref_floor)
        assert float((floor[fin] - ref_floor[fin]).abs().max()) <= 2.0 ** -13 * (1 + float(ref_floor[fin].abs().max()))
        # the floor is below the exact threshold of the true scores (float64)
        scores = true_page_max(q, k, seqlens, 1, scale, slopes)  # page size 1: every token
        valid = torch.isfinite(scores)
        truth = entmax_threshold(torch.where(valid, scores, 0.0), alpha, mask=valid)
        assert bool((floor.double() <= truth).all())
        num_pages = -(-NMAX // page)
        got, ref = _page_mask(idx, nsel, num_pages), _page_mask(ref_idx, ref_n, num_pages)
        # the two selections differ only on pages whose bound lies within rounding of the floor
        ub = reference.sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, page),
                                          page_size=page, scale=scale, alibi_slopes=slopes)
        gap = ((alpha - 1) * ub - ref_floor[..., None]).abs().reshape(2, hkv, gqa, num_pages).amin(2)
        assert bool((gap[got != ref] <= 2.0 ** -12 * (1 + float(ref_floor[fin].abs().max()))).all())
        # every page holding a support token of full entmax is read
        p = torch.clamp((alpha - 1) * scores - truth[..., None], min=0)
        support = torch.nn.functional.pad(p > 0, (0, num_pages * page - NMAX))
        support = support.reshape(2, hkv, gqa, num_pages, page).any(-1).any(2)
        assert bool(got[support].all())
        length_pages = -(-seqlens.long() // page)
        assert torch.equal(nsel[1], length_pages[1].expand(hkv).int()) if bool(read_all[1]) else True


def test_selection_reads_every_page_of_a_head_group_with_a_non_finite_key():
    hkv = 8 if REAL else 2
    q, k, seqlens, _ = sketch_case("iid", seed=4, hq=4 * hkv, hkv=hkv, nmax=NMAX, device=DEVICE)
    k[0, 1, 21, 5] = float("nan")
    k[1, 0, 3, 0] = float("inf")
    sketch = reference.KeySketch.from_cache(k, seqlens)
    idx, nsel, floor = kernel.sketch_select(q, *sketch.buffers(), seqlens, torch.zeros(2, dtype=torch.bool, device=DEVICE),
                                            page_size=16, alpha=1.5, scale=0.2)
    pages = -(-seqlens.long() // 16)
    assert bool((floor[0, 4:8] == float("-inf")).all()) and bool((floor[1, :4] == float("-inf")).all())
    assert int(nsel[0, 1]) == int(pages[0]) and int(nsel[1, 0]) == int(pages[1])
    assert bool(torch.isfinite(floor[0, :4]).all())


FAKE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from entmaxkv_compile.runtime.sketch import kernel, reference
    B, Hq, Hkv, N, D, P = 2, 8, 2, 70, 48, 16
    with FakeTensorMode():
        q, k = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, N, D)
        seqlens = torch.full((B,), N, dtype=torch.int32)
        sketch = reference.KeySketch.allocate(B, Hkv, N, D, dtype=k.dtype, device="cpu")
        kernel.sketch_prefill_(k, seqlens, *sketch.buffers())
        kernel.sketch_append_(k, seqlens - 1, *sketch.buffers())
        cand = torch.ones(B, Hkv, 5, dtype=torch.bool)
        ub = kernel.sketch_page_bounds(q, *sketch.buffers(), seqlens, cand, page_size=P, scale=0.25)
        idx, nsel, floor = kernel.sketch_select(q, *sketch.buffers(), seqlens, torch.zeros(B, dtype=torch.bool),
                                                page_size=P, alpha=1.5, scale=0.25)
        print(tuple(idx.shape), tuple(nsel.shape), tuple(floor.shape))
        print(tuple(ub.shape), ub.dtype)
""")


def test_ops_are_registered_with_fake_shapes():
    for name, mutated in (("triton_sketch_prefill_", {"codes", "scales"}),
                          ("triton_sketch_append_", {"codes", "scales"}),
                          ("triton_sketch_page_bounds", set()), ("triton_sketch_select", set())):
        schema = getattr(torch.ops.entmaxkv, name).default._schema
        writes = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert writes == mutated, name
    proc = subprocess.run([sys.executable, "-c", FAKE_SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-2:] == ["(2, 2, 5) (2, 2) (2, 8)", "(2, 8, 5) torch.float32"]


@pytest.mark.skipif(DEVICE != "cuda", reason="inline PTX: compiled on a GPU only (the interpreter has no asm)")
def test_codes_as_fp16_is_exact_for_every_code():
    """The bit-trick conversion of the scan (:func:`sketch_kernels._codes_as_fp16`) gives every
    int8 code exactly, in a 2-D tile as the scan loads it (four codes per word, in order)."""
    import triton
    import triton.language as tl

    from entmaxkv_compile.runtime.sketch.sketch_kernels import _codes_as_fp16

    @triton.jit
    def convert(c_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
        tl.store(out_ptr + offs, _codes_as_fp16(tl.load(c_ptr + offs)))

    codes = torch.arange(-128, 128, dtype=torch.int16, device=DEVICE).to(torch.int8)
    tile = codes[torch.randperm(256 * 64, device=DEVICE) % 256].view(128, 128).contiguous()
    out = torch.empty(tile.shape, dtype=torch.float16, device=DEVICE)
    convert[(1,)](tile, out, ROWS=128, COLS=128)
    assert torch.equal(out, tile.to(torch.float16))
