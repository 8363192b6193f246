"""Page-statistics kernels (prefill, append) against the reference ``runtime/stats/reference.py``.

CPU: Triton interpreter, tiny shapes. ``ENTMAXKV_KERNEL_TEST_DEVICE=cuda``: compiled, real shapes.
"""


import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE
from conftest import KERNEL_REAL_SHAPES as REAL

from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.stats import reference as cache

pytestmark = pytest.mark.kernels
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _assert_stats_equal(ref: cache.KVPageStats, got: cache.KVPageStats) -> None:
    assert torch.equal(ref.kmin, got.kmin) and torch.equal(ref.kmax, got.kmax)
    assert torch.allclose(ref.kmean, got.kmean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ref.km2, got.km2, rtol=1e-4, atol=1e-4)


def _poisoned_like(stats: cache.KVPageStats) -> cache.KVPageStats:
    out = cache.KVPageStats(*(torch.full_like(b, float("nan")) for b in stats.buffers()),
                            page_size=stats.page_size)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [8, 16])
def test_prefill_matches_reference(dtype, page_size):
    gen = torch.Generator().manual_seed(page_size)
    batch, hkv, nmax, dim = (3, 8, 5003, 128) if REAL else (3, 2, 45, 24)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen).to(device=DEVICE, dtype=dtype)
    seqlens = torch.tensor([nmax, nmax // 3 + 1, 1], dtype=torch.int32, device=DEVICE)
    ref = cache.KVPageStats.from_cache(k, seqlens, page_size)
    got = _poisoned_like(ref)
    kernels.stats_prefill_(k, seqlens, page_size, *got.buffers())
    _assert_stats_equal(ref, got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_appends_match_reference_and_prefill(dtype):
    """Ragged appends across several page boundaries equal the reference step by step and a
    from-scratch prefill at the end (min/max exactly)."""
    gen = torch.Generator().manual_seed(1)
    page = 8 if not REAL else 16
    batch, hkv, nmax, dim = (2, 8, 4096, 128) if REAL else (2, 2, 40, 16)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen).to(device=DEVICE, dtype=dtype)
    start = torch.tensor([5, 13], dtype=torch.int32, device=DEVICE)
    ref = cache.KVPageStats.from_cache(k, start, page)
    got = cache.KVPageStats(*(b.clone() for b in ref.buffers()), page_size=page)
    positions = start.clone()
    for _ in range(21):
        cache.stats_append_(k, positions, page, *ref.buffers())
        kernels.stats_append_(k, positions, page, *got.buffers())
        positions += 1
    _assert_stats_equal(ref, got)
    scratch = cache.KVPageStats.from_cache(k, positions, page)
    assert torch.equal(scratch.kmin, got.kmin) and torch.equal(scratch.kmax, got.kmax)
    assert torch.allclose(scratch.kmean, got.kmean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(scratch.km2, got.km2, rtol=1e-4, atol=1e-4)


# Kernel and reference may round a float32 value one ulp apart when their float32 sums differ in
# the last bit; later appends carry that on, so within a page of P appends they stay within P/2
# ulps of (|value| + the data scale, 1 here).
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compact_moments_prefill_and_appends_match_reference(dtype):
    """fp16/bf16 kmean/km2: the kernels round their float32 results like the reference does, on
    prefill and on ragged appends across page boundaries."""
    gen = torch.Generator().manual_seed(5)
    page = 16 if REAL else 8
    batch, hkv, nmax, dim = (2, 8, 4099, 128) if REAL else (2, 2, 43, 24)
    k = (torch.randn(batch, hkv, nmax, dim, generator=gen) * 2).to(device=DEVICE, dtype=dtype)
    start = torch.tensor([nmax - 30, 3], dtype=torch.int32, device=DEVICE)
    ref = cache.KVPageStats.from_cache(k, start, page, moment_dtype=dtype)
    got = _poisoned_like(ref)
    kernels.stats_prefill_(k, start, page, *got.buffers())
    assert got.kmean.dtype == dtype and got.km2.dtype == dtype
    positions = start.clone()
    for step in range(19):
        if step:
            cache.stats_append_(k, positions, page, *ref.buffers())
            kernels.stats_append_(k, positions, page, *got.buffers())
            positions += 1
        assert torch.equal(ref.kmin, got.kmin) and torch.equal(ref.kmax, got.kmax)
        for a, b in ((ref.kmean, got.kmean), (ref.km2, got.km2)):
            a, b = a.float(), b.float()
            assert ((a - b).abs() <= page / 2 * ULP[dtype] * (a.abs() + 1.0)).all()


def test_float16_m2_saturates_on_prefill_appends_and_rebuilds():
    """A page whose float32 M2 passes float16's range is stored as 65504 by every writer (kernel
    and reference: prefill, appends, the rolling rebuild), not +inf; a NaN key still gives NaN."""
    page = 8
    k = torch.randn(1, 2, 40, 24, generator=torch.Generator().manual_seed(3))
    k[0, 0, 17] = 300.0  # page 2 of KV head 0
    k[0, 1, 30, 5] = float("nan")  # page 3 of KV head 1
    k = k.to(device=DEVICE, dtype=torch.float16)
    lengths = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    ref = cache.KVPageStats.from_cache(k, lengths, page, moment_dtype=torch.float16, check_values=False)
    got = _poisoned_like(ref)
    kernels.stats_prefill_(k, lengths, page, *got.buffers())
    appended, appended_ref = _poisoned_like(ref), _poisoned_like(ref)
    for pos in range(40):
        at = torch.tensor([pos], device=DEVICE)
        kernels.stats_append_(k, at, page, *appended.buffers())
        cache.stats_append_(k, at, page, *appended_ref.buffers())
    for stats in (ref, got, appended, appended_ref):
        assert float(stats.km2[0, 0, 2].max()) == 65504 and torch.isfinite(stats.km2[0, 0]).all()
        assert stats.km2[0, 1, 3, 5].isnan() and torch.isfinite(stats.km2[0, 1, :3]).all()
    rebuilt = _poisoned_like(ref)
    kernels.stats_rebuild_page_(k, torch.tensor([17], device=DEVICE), lengths, page, *rebuilt.buffers())
    assert float(rebuilt.km2[0, 0, 2].max()) == 65504


def test_stat_ops_are_registered():
    assert hasattr(torch.ops.entmaxkv, "triton_stats_prefill_")
    assert hasattr(torch.ops.entmaxkv, "triton_stats_append_")


@pytest.mark.parametrize("change", ["page_size", "kmean_dtype", "seqlens_shape"])
def test_bad_inputs_raise(change):
    k = torch.randn(1, 1, 16, 8, device=DEVICE)
    stats = cache.KVPageStats.allocate(1, 1, 16, 8, 8, torch.float32, DEVICE)
    seqlens = torch.tensor([16], dtype=torch.int32, device=DEVICE)
    bufs = list(stats.buffers())
    page = 8
    if change == "page_size":
        page = 3
    elif change == "kmean_dtype":
        bufs[2] = bufs[2].half()
    else:
        seqlens = seqlens.repeat(2)
    with pytest.raises(ValueError):
        kernels.stats_prefill_(k, seqlens, page, *bufs)
