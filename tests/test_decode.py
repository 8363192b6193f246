"""Paged decode, the certificate and sparse_decode against exact dense entmax (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.runtime.attend.reference import paged_decode
from entmaxkv_compile.runtime.certify.reference import certify
from entmaxkv_compile.runtime.decode import DecodeResult, sparse_decode
from entmaxkv_compile.metrics import dropped_mass, full_entmax_decode, relative_error, support_recall
from entmaxkv_compile.math.reference import entmax
from entmaxkv_compile.runtime.select.reference import compact_page_mask, select_pages, selected_token_mask

ALPHAS = [1.25, 4 / 3, 1.5, 2.0]


def random_case(seed, batch=3, kv_heads=2, group=4, nmax=37, dim=8, dtype=torch.float64, alibi=False,
                structured=False, poison=True):
    """q, caches, ragged seqlens (one full, one tiny), ALiBi slopes; optionally planted clusters of
    keys aligned with each group's query direction (small support), NaN past every seqlen."""
    gen = torch.Generator().manual_seed(seed)
    q_heads = kv_heads * group
    seqlens = torch.randint(1, nmax + 1, (batch,), generator=gen)
    seqlens[0] = nmax
    if batch > 2:
        seqlens[-1] = min(nmax, 1 + seqlens[-1] % 5)
    if structured:
        direction = torch.randn(batch, kv_heads, 1, dim, generator=gen, dtype=torch.float64)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        q = 2 * math.sqrt(dim) * direction.repeat_interleave(group, 1)
        q = q + 0.3 * torch.randn(batch, q_heads, 1, dim, generator=gen, dtype=torch.float64)
        k = 0.3 * torch.randn(batch, kv_heads, nmax, dim, generator=gen, dtype=torch.float64)
        planted = torch.rand(batch, kv_heads, nmax, 1, generator=gen) < 0.08
        strength = 2 + 3 * torch.rand(batch, kv_heads, nmax, 1, generator=gen, dtype=torch.float64)
        k = k + torch.where(planted, strength, 0.0) * direction
    else:
        q = torch.randn(batch, q_heads, 1, dim, generator=gen, dtype=torch.float64) * 2
        k = torch.randn(batch, kv_heads, nmax, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, nmax, dim, generator=gen, dtype=torch.float64)
    if poison:
        past = (torch.arange(nmax)[None, :] >= seqlens[:, None])[:, None, :, None]
        k = torch.where(past, float("nan"), k)
        v = torch.where(past, float("inf"), v)
    slopes = None
    if alibi:
        slopes = torch.rand(q_heads, generator=gen, dtype=torch.float64)
        slopes[::2] = 0.0  # NoPE heads next to ALiBi heads
    return q.to(dtype), k.to(dtype), v.to(dtype), seqlens, slopes


def all_pages(seqlens, kv_heads, num_pages, page_size):
    pages = torch.arange(num_pages)[None, None, :] < ((seqlens + page_size - 1) // page_size)[:, None, None]
    return compact_page_mask(pages.expand(len(seqlens), kv_heads, num_pages))


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_paged_decode_with_every_page_is_full_entmax(alpha, group, alibi):
    q, k, v, seqlens, slopes = random_case(int(alpha * 100) + group, group=group, alibi=alibi)
    page_size, scale = 4, 0.41
    idx, num = all_pages(seqlens, 2, 10, page_size)
    out, tau = paged_decode(q, k, v, seqlens, idx, num, page_size=page_size, alpha=alpha, scale=scale,
                            alibi_slopes=slopes)
    ref, _ = full_entmax_decode(q, k, v, seqlens, alpha, scale, slopes)
    assert out.dtype == torch.float64 and out.shape == q.shape
    assert tau.dtype == torch.float32 and tau.shape == q.shape[:2]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_paged_decode_attends_exactly_the_selected_pages_of_each_kv_head(alpha):
    group, page_size, scale = 4, 4, 0.5
    q, k, v, seqlens, slopes = random_case(17, group=group, nmax=30, alibi=True)
    gen = torch.Generator().manual_seed(1)
    pages = torch.rand(3, 2, 8, generator=gen) < 0.5
    idx, num = compact_page_mask(pages)
    out, tau = paged_decode(q, k, v, seqlens, idx, num, page_size=page_size, alpha=alpha, scale=scale,
                            alibi_slopes=slopes)
    tokens = selected_token_mask(idx, num, seqlens, page_size=page_size, max_seqlen=30)
    tokens = tokens.repeat_interleave(group, dim=1)  # [B, Hq, N]: head h reads KV head h // G
    kq = torch.nan_to_num(k).repeat_interleave(group, 1)
    vq = torch.nan_to_num(v, posinf=0.0).repeat_interleave(group, 1)
    rel = torch.arange(30)[None, :] - (seqlens[:, None] - 1)
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], kq) * scale + slopes[None, :, None] * rel[:, None, :]
    empty = ~tokens.any(-1)
    probs = entmax(torch.where(tokens, scores, float("-inf")), alpha=alpha, dim=-1, mask=tokens | empty[..., None])
    expected = torch.einsum("bhn,bhnd->bhd", torch.where(tokens, probs, 0.0), vq)
    rows = ~empty
    torch.testing.assert_close(out[:, :, 0][rows], expected[rows], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_decode_keeps_dtype_and_tracks_float64(dtype):
    q, k, v, seqlens, slopes = random_case(5, alibi=True, dtype=dtype)
    result = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(selector="certified", page_size=4), alibi_slopes=slopes)
    assert result.out.dtype == dtype and result.tau.dtype == torch.float32
    assert result.delta_bound.dtype == torch.float32 and result.certified.dtype == torch.bool
    ref, _ = full_entmax_decode(q.double(), k.double(), v.double(), seqlens, 1.5, 1 / math.sqrt(8), slopes)
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}[dtype]
    assert relative_error(result.out, ref) < tolerance


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    group=st.sampled_from([1, 4, 8]),
    alpha=st.sampled_from(ALPHAS),
    alibi=st.booleans(),
    structured=st.booleans(),
    page_size=st.sampled_from([4, 16]),
    nmax=st.integers(1, 120),
)
def test_certified_selector_equals_full_entmax(seed, group, alpha, alibi, structured, page_size, nmax):
    q, k, v, seqlens, slopes = random_case(seed, kv_heads=2, group=group, nmax=nmax, dim=16, alibi=alibi,
                                           structured=structured)
    config = EntmaxKVConfig(selector="certified", page_size=page_size, alpha=alpha)
    result = sparse_decode(q, k, v, seqlens, config, alibi_slopes=slopes)
    ref, probs = full_entmax_decode(q, k, v, seqlens, alpha, 0.25, slopes)
    assert result.certified.all()
    assert (result.delta_bound == 0).all()
    torch.testing.assert_close(result.out, ref, rtol=1e-6, atol=1e-6)
    tokens = selected_token_mask(result.page_indices, result.num_selected, seqlens, page_size=page_size,
                                 max_seqlen=nmax)
    assert (dropped_mass(probs, tokens) == 0).all() and (support_recall(probs, tokens) == 1).all()


def test_certified_structured_caches_stay_sparse():
    """On planted-cluster caches the certificate holds long before dense: most pages are skipped."""
    kept, total = 0, 0
    for seed in range(6):
        q, k, v, seqlens, _ = random_case(seed, batch=2, nmax=512, dim=16, structured=True, poison=False)
        seqlens[:] = 512
        config = EntmaxKVConfig(selector="certified", page_size=16, certify_max_rounds=2)
        result = sparse_decode(q, k, v, seqlens, config)
        ref, _ = full_entmax_decode(q, k, v, seqlens, 1.5, 0.25)
        torch.testing.assert_close(result.out, ref, rtol=1e-6, atol=1e-6)
        kept, total = kept + int(result.num_selected.sum()), total + 32 * result.num_selected.numel()
    assert kept < 0.7 * total, (kept, total)


@pytest.mark.parametrize("rounds", [1, 2])
def test_one_round_certifies_even_from_a_minimal_selection(rounds):
    q, k, v, seqlens, slopes = random_case(3, nmax=64, dim=16, alibi=True)
    config = EntmaxKVConfig(selector="certified", page_size=4, certify_max_rounds=rounds, margin=-50.0)
    result = sparse_decode(q, k, v, seqlens, config, alibi_slopes=slopes)
    ref, _ = full_entmax_decode(q, k, v, seqlens, 1.5, 0.25, slopes)
    assert result.certified.all()
    torch.testing.assert_close(result.out, ref, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    group=st.sampled_from([1, 4, 8]),
    alpha=st.sampled_from(ALPHAS),
    alibi=st.booleans(),
    structured=st.booleans(),
    selector=st.sampled_from(["gaussian", "topk"]),
    margin=st.sampled_from([0.0, -1.0]),
)
def test_delta_bound_bounds_the_dropped_mass(seed, group, alpha, alibi, structured, selector, margin):
    q, k, v, seqlens, slopes = random_case(seed, group=group, nmax=70, dim=16, alibi=alibi, structured=structured)
    config = EntmaxKVConfig(selector=selector, page_size=4, alpha=alpha, token_budget=12, margin=margin,
                            report_bound=True)
    result = sparse_decode(q, k, v, seqlens, config, alibi_slopes=slopes)
    _, probs = full_entmax_decode(q, k, v, seqlens, alpha, 0.25, slopes)
    tokens = selected_token_mask(result.page_indices, result.num_selected, seqlens, page_size=4, max_seqlen=70)
    dropped = dropped_mass(probs, tokens)
    assert (dropped <= result.delta_bound.double() + 1e-6).all()
    assert (dropped[result.certified] <= 1e-12).all()


def test_certify_flags_an_unselected_page_holding_support():
    q, k, v, seqlens, _ = random_case(2, batch=1, group=1, nmax=16, dim=4, poison=False)
    k[0, :, 5] = 10 * q[0, :, 0]  # row 5 (page 1) dominates every head
    stats = KVPageStats.from_cache(k, seqlens, 4)
    idx, num = compact_page_mask(torch.tensor([[[True, False, True, True]] * 2]))
    out, tau = paged_decode(q, k, v, seqlens, idx, num, page_size=4, alpha=1.5, scale=0.5)
    certified, delta = certify(q, stats.kmin, stats.kmax, seqlens, idx, num, tau, page_size=4, alpha=1.5, scale=0.5)
    assert not certified.any() and (delta > 0).all() and (delta <= 1).all()
    full_idx, full_num = all_pages(seqlens, 2, 4, 4)
    _, tau_full = paged_decode(q, k, v, seqlens, full_idx, full_num, page_size=4, alpha=1.5, scale=0.5)
    certified, delta = certify(q, stats.kmin, stats.kmax, seqlens, full_idx, full_num, tau_full,
                               page_size=4, alpha=1.5, scale=0.5)
    assert certified.all() and (delta == 0).all()


def test_sparse_decode_result_and_given_stats():
    q, k, v, seqlens, slopes = random_case(4, alibi=True)
    config = EntmaxKVConfig(selector="topk", page_size=8, token_budget=16, sink_pages=1)
    stats = KVPageStats.from_cache(k, seqlens, 8)
    given_stats = sparse_decode(q, k, v, seqlens, config, stats=stats, alibi_slopes=slopes, scale=0.3)
    built = sparse_decode(q, k, v, seqlens, config, alibi_slopes=slopes, scale=0.3)
    assert isinstance(given_stats, DecodeResult)
    assert all(torch.equal(a, b) for a, b in zip(given_stats, built))
    assert given_stats.page_indices.shape == (3, 2, 5) and (given_stats.num_selected <= 2).all()
    default = sparse_decode(q, k, v, seqlens)  # gaussian, alpha 1.5, scale 1/sqrt(D)
    idx, num = select_pages(q, *KVPageStats.from_cache(k, seqlens, 16).buffers(), seqlens, page_size=16,
                            alpha=1.5, scale=1 / math.sqrt(8), selector="gaussian", token_budget=4096,
                            max_quantile=0.99, margin=0.0, tau_estimate="auto", sink_pages=0,
                            recent_pages=0, min_context=0)
    assert torch.equal(default.page_indices, idx) and torch.equal(default.num_selected, num)
    with pytest.raises(ValueError, match="page_size"):
        sparse_decode(q, k, v, seqlens, config.replace(page_size=4), stats=stats)
    with pytest.raises(TypeError, match="stats"):
        sparse_decode(q, k, v, seqlens, config, stats=stats.buffers())
    with pytest.raises(TypeError, match="config"):
        sparse_decode(q, k, v, seqlens, config={"selector": "topk"})


def test_dense_selector_is_exact_and_certified():
    q, k, v, seqlens, slopes = random_case(6, group=8, alibi=True)
    result = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(selector="dense", alpha=2.0, page_size=4),
                           alibi_slopes=slopes)
    ref, _ = full_entmax_decode(q, k, v, seqlens, 2.0, 1 / math.sqrt(8), slopes)
    torch.testing.assert_close(result.out, ref, rtol=1e-10, atol=1e-10)
    assert result.certified.all() and (result.delta_bound == 0).all()


def test_paged_decode_rejects_bad_page_tables():
    q, k, v, seqlens, _ = random_case(0)
    idx, num = all_pages(seqlens, 2, 10, 4)
    kwargs = dict(page_size=4, alpha=1.5, scale=0.5)
    with pytest.raises(ValueError, match="page_indices"):
        paged_decode(q, k, v, seqlens, idx[:, :, :3], num, **kwargs)
    with pytest.raises(TypeError, match="num_selected"):
        paged_decode(q, k, v, seqlens, idx, num.float(), **kwargs)
    with pytest.raises(ValueError, match="alpha"):
        paged_decode(q, k, v, seqlens, idx, num, page_size=4, alpha=0.5, scale=0.5)
    stats = KVPageStats.from_cache(k, seqlens, 4)
    with pytest.raises(ValueError, match="tau"):
        certify(q, stats.kmin, stats.kmax, seqlens, idx, num, torch.zeros(3), **kwargs)


def brute_force_bounds(q, stats, seqlens, scale, slopes):
    """Quest bounds by explicit loops, float64: ``[B, Hq, Npages]``, -inf on invalid pages."""
    batch, q_heads = q.shape[:2]
    group = q_heads // stats.kmin.shape[1]
    page_size, num_pages = stats.page_size, stats.num_pages
    bounds = torch.full((batch, q_heads, num_pages), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        length = int(seqlens[b])
        for h in range(q_heads):
            qh = q[b, h, 0].double()
            for p in range(math.ceil(length / page_size)):
                lo, hi = stats.kmin[b, h // group, p].double(), stats.kmax[b, h // group, p].double()
                u = scale * torch.maximum(qh * lo, qh * hi).sum()
                if slopes is not None:
                    rows = torch.arange(p * page_size, min((p + 1) * page_size, length))
                    u = u + (float(slopes[h]) * (rows - (length - 1))).max()
                bounds[b, h, p] = u
    return bounds


@pytest.mark.parametrize("alpha", ALPHAS)
def test_certify_matches_its_definition(alpha):
    group, page_size, scale = 4, 4, 0.5
    q, k, v, seqlens, slopes = random_case(23, group=group, nmax=30, alibi=True)
    stats = KVPageStats.from_cache(k, seqlens, page_size)
    pages = torch.rand(3, 2, 8, generator=torch.Generator().manual_seed(2)) < 0.6
    idx, num = compact_page_mask(pages)
    tau = torch.randn(3, 2 * group, dtype=torch.float64)  # any tau: certify is a pure predicate of it
    certified, delta = certify(q, stats.kmin, stats.kmax, seqlens, idx, num, tau, page_size=page_size,
                               alpha=alpha, scale=scale, alibi_slopes=slopes)
    excess = (alpha - 1) * brute_force_bounds(q, stats, seqlens, scale, slopes) - tau[..., None]
    unselected = ~pages.repeat_interleave(group, dim=1) & torch.isfinite(excess)
    counts = (seqlens[:, None] - torch.arange(8)[None, :] * page_size).clamp(0, page_size)[:, None, :]
    expected_delta = torch.where(unselected, counts * excess.clamp(min=0) ** (1 / (alpha - 1)), 0.0).sum(-1)
    assert torch.equal(certified, ~(unselected & (excess > 0)).any(-1))
    assert 0 < certified.sum() < certified.numel()
    torch.testing.assert_close(delta.double(), expected_delta.clamp(max=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alibi", [False, True])
def test_one_certify_round_adds_exactly_the_violating_pages(alibi):
    group, page_size, scale, alpha = 4, 4, 0.25, 1.5
    q, k, v, seqlens, slopes = random_case(32, group=group, nmax=64, dim=16, alibi=alibi, structured=True)
    stats = KVPageStats.from_cache(k, seqlens, page_size)
    # a negative margin starves the gaussian start, so the round has pages to add
    config = EntmaxKVConfig(selector="certified", page_size=page_size, certify_max_rounds=1, margin=-1.5)
    result = sparse_decode(q, k, v, seqlens, config, alibi_slopes=slopes, scale=scale)

    start = sparse_decode(q, k, v, seqlens, config.replace(selector="gaussian"), alibi_slopes=slopes, scale=scale)
    bounds = brute_force_bounds(q, stats, seqlens, scale, slopes)
    chosen = torch.zeros(3, 2, stats.num_pages, dtype=torch.bool)
    for b in range(3):
        for h in range(2):
            chosen[b, h, start.page_indices[b, h, : start.num_selected[b, h]].long()] = True
    _, tau0 = paged_decode(q, k, v, seqlens, *compact_page_mask(chosen), page_size=page_size, alpha=alpha,
                           scale=scale, alibi_slopes=slopes)
    violating = ((alpha - 1) * bounds > tau0.double()[..., None]) & ~chosen.repeat_interleave(group, 1)
    assert violating.any(), "the starved start must leave pages for the round to add"
    after_round = chosen | violating.view(3, 2, group, -1).any(2)
    _, tau1 = paged_decode(q, k, v, seqlens, *compact_page_mask(after_round), page_size=page_size, alpha=alpha,
                           scale=scale, alibi_slopes=slopes)
    still = ((alpha - 1) * bounds > tau1.double()[..., None]) & ~after_round.repeat_interleave(group, 1)
    dense = torch.arange(stats.num_pages)[None, None, :] < ((seqlens + page_size - 1) // page_size)[:, None, None]
    expected = torch.where(still.view(3, 2, group, -1).any(-1).any(-1)[..., None], dense, after_round)
    assert torch.equal(result.page_indices, compact_page_mask(expected)[0])
    assert result.certified.all()
