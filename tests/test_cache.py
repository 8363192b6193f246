"""Page statistics: one-pass prefill and O(D) append against brute-force per-page statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile.runtime.stats.reference import KVPageStats, page_token_counts, stats_append_, stats_prefill_


def brute_force_stats(k_cache: torch.Tensor, seqlens: torch.Tensor, page_size: int):
    """Per-page min/max/mean/var by an explicit loop (float64 moments)."""
    batch, heads, nmax, dim = k_cache.shape
    pages = math.ceil(nmax / page_size)
    kmin = torch.zeros(batch, heads, pages, dim, dtype=k_cache.dtype)
    kmax = torch.zeros_like(kmin)
    mean = torch.zeros(batch, heads, pages, dim, dtype=torch.float64)
    var = torch.zeros_like(mean)
    for b in range(batch):
        length = int(seqlens[b])
        for p in range(pages):
            rows = k_cache[b, :, p * page_size: min((p + 1) * page_size, length)]
            if rows.shape[1] == 0:
                continue
            kmin[b, :, p] = rows.amin(1)
            kmax[b, :, p] = rows.amax(1)
            mean[b, :, p] = rows.double().mean(1)
            var[b, :, p] = rows.double().var(1, unbiased=False)
    return kmin, kmax, mean, var


def variance(stats: KVPageStats, seqlens: torch.Tensor) -> torch.Tensor:
    counts = page_token_counts(seqlens, stats.page_size, stats.num_pages)[:, None, :, None]
    return stats.km2.double() / counts.clamp(min=1)


def poison_past_seqlens(k_cache: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
    """Fill rows at or past each length with NaN/inf so any leak into the stats shows."""
    rows = torch.arange(k_cache.shape[2])
    invalid = rows[None, :] >= seqlens[:, None]
    garbage = torch.full_like(k_cache, float("nan"))
    garbage[..., ::2] = float("inf")
    return torch.where(invalid[:, None, :, None], garbage, k_cache)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    nmax=st.integers(1, 70),
    dim=st.integers(1, 9),
    page_size=st.sampled_from([1, 2, 4, 16]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_prefill_matches_brute_force(batch, heads, nmax, dim, page_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(batch, heads, nmax, dim, generator=gen) * 3).to(dtype)
    seqlens = torch.randint(1, nmax + 1, (batch,), generator=gen)
    k = poison_past_seqlens(k, seqlens)
    stats = KVPageStats.from_cache(k, seqlens, page_size)
    kmin, kmax, mean, var = brute_force_stats(k, seqlens, page_size)
    assert stats.kmin.dtype == dtype and stats.kmean.dtype == torch.float32
    assert torch.equal(stats.kmin, kmin) and torch.equal(stats.kmax, kmax)
    torch.testing.assert_close(stats.kmean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variance(stats, seqlens), var, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("page_size", [4, 16])
def test_thousand_ragged_appends_equal_from_scratch(page_size):
    gen = torch.Generator().manual_seed(1234 + page_size)
    batch, heads, dim, steps = 3, 2, 7, 1000
    start = torch.tensor([1, 37, 100])
    nmax = int(start.max()) + steps + 5  # not a multiple of the page size
    k = torch.randn(batch, heads, nmax, dim, generator=gen) + 2.0
    k = poison_past_seqlens(k, start)
    stats = KVPageStats.from_cache(k, start, page_size)
    seqlens = start.clone()
    for step in range(steps):
        positions = seqlens.clone()
        k[torch.arange(batch), :, positions] = torch.randn(batch, heads, dim, generator=gen) + 2.0
        stats.append(k, positions, check_values=False)
        seqlens += 1
        if step in (0, 15, 16, 999):
            fresh = KVPageStats.from_cache(k, seqlens, page_size)
            assert torch.equal(stats.kmin, fresh.kmin) and torch.equal(stats.kmax, fresh.kmax)
            torch.testing.assert_close(stats.kmean, fresh.kmean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(variance(stats, seqlens), variance(fresh, seqlens), rtol=1e-5, atol=1e-5)


def test_append_touches_only_the_written_page():
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(2, 4, 40, 8, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    seqlens = torch.tensor([17, 33])
    stats = KVPageStats.from_cache(k, seqlens, 8)
    before = [b.clone() for b in stats.buffers()]
    stats.append(k, seqlens)  # rows 17 (page 2, offset 1) and 33 (page 4, offset 1)
    written = torch.zeros(2, stats.num_pages, dtype=torch.bool)
    written[0, 2] = written[1, 4] = True
    for old, new in zip(before, stats.buffers()):
        untouched = ~written[:, None, :, None].expand_as(new)
        assert torch.equal(old[untouched], new[untouched])
        assert not torch.equal(old[~untouched], new[~untouched])


def test_append_on_page_start_resets_stale_page():
    k = torch.zeros(1, 1, 8, 2)
    k[0, 0, 4] = torch.tensor([5.0, -3.0])
    stats = KVPageStats.allocate(1, 1, 8, 2, page_size=4)
    for buf in stats.buffers():
        buf.fill_(float("nan"))  # stale garbage must be overwritten, not folded in
    # rows 0..3 were never appended: the host check refuses, the device flag records it
    stats.append(k, torch.tensor([4]), check_values=False)
    assert not bool(stats.valid[0])
    assert stats.kmin[0, 0, 1].tolist() == [5.0, -3.0] and stats.kmax[0, 0, 1].tolist() == [5.0, -3.0]
    assert stats.kmean[0, 0, 1].tolist() == [5.0, -3.0] and stats.km2[0, 0, 1].tolist() == [0.0, 0.0]


def test_functional_ops_write_in_place():
    k = torch.randn(1, 2, 10, 3)
    seqlens = torch.tensor([10], dtype=torch.int32)
    stats = KVPageStats.allocate(1, 2, 10, 3, page_size=4)
    pointers = [b.data_ptr() for b in stats.buffers()]
    stats_prefill_(k, seqlens, 4, *stats.buffers())
    stats_append_(k, torch.tensor([9], dtype=torch.int32), 4, *stats.buffers())
    assert [b.data_ptr() for b in stats.buffers()] == pointers
    assert torch.equal(stats.kmax[0, :, 2], k[0, :, 8:10].amax(1))


def test_page_token_counts_partial_last_page():
    counts = page_token_counts(torch.tensor([1, 16, 17, 40]), 16, 3)
    assert counts.tolist() == [[1, 0, 0], [16, 0, 0], [16, 1, 0], [16, 16, 8]]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda k, s: KVPageStats.from_cache(k, s, page_size=3), ValueError, "page_size"),
        (lambda k, s: KVPageStats.from_cache(k, s, page_size=4.0), TypeError, "page_size"),
        (lambda k, s: KVPageStats.from_cache(k.int(), s), TypeError, "k_cache"),
        (lambda k, s: KVPageStats.from_cache(k[0], s), ValueError, "k_cache"),
        (lambda k, s: KVPageStats.from_cache(k, s.float()), TypeError, "seqlens"),
        (lambda k, s: KVPageStats.from_cache(k, s[:1]), ValueError, "seqlens"),
        (lambda k, s: KVPageStats.from_cache(k, s * 0), ValueError, "seqlens"),
        (lambda k, s: KVPageStats.from_cache(k, s + 100), ValueError, "seqlens"),
        (lambda k, s: KVPageStats.from_cache(k, s, 4).append(k, s + 100), ValueError, "positions"),
        (lambda k, s: KVPageStats.from_cache(k, s, 4).append(k, s - 100), ValueError, "positions"),
        (lambda k, s: KVPageStats.from_cache(k, s, 4).append(k[:, :1], s), ValueError, "k_cache"),
        (lambda k, s: KVPageStats.allocate(2, 2, 20, 4, dtype=torch.int64), TypeError, "dtype"),
        (lambda k, s: KVPageStats.allocate(0, 2, 20, 4), ValueError, "batch"),
        (lambda k, s: stats_prefill_(k, s, 4, *KVPageStats.allocate(2, 2, 20, 4, 4, torch.float64).buffers()),
         TypeError, "kmin"),
        (lambda k, s: stats_prefill_(k, s, 8, *KVPageStats.allocate(2, 2, 20, 4, 4).buffers()),
         ValueError, "kmin"),
        (lambda k, s: KVPageStats.from_cache(k, s, moment_dtype=torch.float16), ValueError, "moment_dtype"),
        (lambda k, s: KVPageStats.from_cache(k, s, moment_dtype="half"), TypeError, "moment_dtype"),
        (lambda k, s: stats_prefill_(k.half(), s, 4, *_mixed_moment_buffers()), TypeError, "km2"),
    ],
)
def test_bad_inputs_raise(call, error, match):
    k = torch.randn(2, 2, 20, 4)
    seqlens = torch.tensor([5, 20])
    with pytest.raises(error, match=match):
        call(k, seqlens)


def _mixed_moment_buffers():
    """fp16 stats whose kmean is compact but km2 float32: the pair must share a dtype."""
    stats = KVPageStats.allocate(2, 2, 20, 4, 4, torch.float16, moment_dtype=torch.float16)
    return stats.kmin, stats.kmax, stats.kmean, stats.km2.float()


# Compact moments round each stored value to the cache dtype; every append re-rounds the mean
# and M2, so after a page's P appends the error is at most about P/2 ulps (random-walk: fewer).
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("moment_dtype", ["cache", None])
def test_compact_moment_buffers(dtype, moment_dtype):
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3, 37, 5, generator=gen).to(dtype)
    seqlens = torch.tensor([37, 20])
    stats = KVPageStats.from_cache(k, seqlens, 8, moment_dtype=moment_dtype)
    want = dtype if moment_dtype == "cache" else torch.float32
    assert stats.kmean.dtype == want and stats.km2.dtype == want
    assert stats.kmin.dtype == dtype
    exact = KVPageStats.from_cache(k, seqlens, 8)
    # Prefill computes in float32 and rounds once: each value is the rounding of the float32 one.
    assert torch.equal(stats.kmean, exact.kmean.to(want))
    assert torch.equal(stats.km2, exact.km2.to(want))


@pytest.mark.parametrize("dtype, page_size", [(torch.float16, 16), (torch.bfloat16, 8)])
def test_compact_moments_after_many_appends_close_to_scratch(dtype, page_size):
    """Ragged appends over several pages with rounded storage stay within P/2 ulps (relative to
    the page's scale) of a from-scratch float32 prefill."""
    gen = torch.Generator().manual_seed(11)
    batch, heads, nmax, dim = 3, 2, 150, 16
    k = (torch.randn(batch, heads, nmax, dim, generator=gen) * 3 + 1).to(dtype)
    start = torch.tensor([1, 9, 40])
    stats = KVPageStats.from_cache(k, start, page_size, moment_dtype=dtype)
    positions = start.clone()
    for _ in range(100):
        stats.append(k, positions)
        positions += 1
    exact = KVPageStats.from_cache(k, positions, page_size)
    tol = page_size / 2 * EPS[dtype]
    counts = page_token_counts(positions, page_size, stats.num_pages)[:, None, :, None].clamp(min=1)
    spread = (exact.km2 / counts).sqrt() + exact.kmean.abs()  # the page's scale per dim
    assert torch.equal(stats.kmin, exact.kmin) and torch.equal(stats.kmax, exact.kmax)
    assert ((stats.kmean.float() - exact.kmean).abs() <= tol * spread).all()
    m2_err = (stats.km2.float() - exact.km2).abs()
    assert (m2_err <= 2 * tol * (exact.km2 + counts * spread * spread * EPS[dtype])).all()
    assert m2_err.max() > 0, "rounded storage should differ somewhere from float32"


@pytest.mark.parametrize("budget", [1, 3 * 2 * 16 * 24 + 5])
def test_prefill_in_spans_equals_one_pass(monkeypatch, budget):
    """The prefill walks the cache in page spans of bounded size (its float32 temporaries of a
    whole 8 x 1M-token cache did not fit a GPU): one page per span, or two, equal one pass."""
    from entmaxkv_compile.runtime import _common

    torch.manual_seed(3)
    k = torch.randn(2, 3, 101, 24, dtype=torch.float16)
    k[0, 1, 7, 3] = float("nan")
    seqlens = torch.tensor([101, 37])
    whole = KVPageStats.from_cache(k, seqlens, 16, check_values=False).buffers()
    monkeypatch.setattr(_common, "REFERENCE_CHUNK_ELEMENTS", budget)
    pieces = KVPageStats.from_cache(k, seqlens, 16, check_values=False).buffers()
    for a, b in zip(whole, pieces):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
