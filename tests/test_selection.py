"""Page scoring and selection: Quest bounds, top-k, gaussian, forced pages, compaction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.runtime.select.reference import (
    compact_page_mask,
    page_mask_from_indices,
    quest_bounds,
    select_pages,
    selected_token_mask,
)

ALPHAS = [1.25, 4 / 3, 1.5, 2.0]
DEFAULTS = dict(alpha=1.5, selector="gaussian", token_budget=32, max_quantile=0.99, margin=0.0,
                tau_estimate="auto", sink_pages=0, recent_pages=0, min_context=0)


def make_case(seed, batch=2, kv_heads=2, group=2, nmax=45, dim=8, page_size=4, dtype=torch.float32,
              alibi=False, score_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, kv_heads * group, 1, dim, generator=gen, dtype=torch.float64) * score_scale).to(dtype)
    k = torch.randn(batch, kv_heads, nmax, dim, generator=gen, dtype=torch.float64).to(dtype)
    seqlens = torch.randint(1, nmax + 1, (batch,), generator=gen)
    seqlens[0] = nmax
    slopes = torch.rand(kv_heads * group, generator=gen, dtype=torch.float64).to(dtype) if alibi else None
    return q, k, seqlens, slopes, KVPageStats.from_cache(k, seqlens, page_size)


def run_select(q, stats, seqlens, slopes=None, **overrides):
    args = {**DEFAULTS, **overrides}
    scale = args.pop("scale", 1 / math.sqrt(q.shape[-1]))
    return select_pages(q, *stats.buffers(), seqlens, page_size=stats.page_size, scale=scale,
                        alibi_slopes=slopes, **args)


def assert_invariants(page_indices, num_selected, seqlens, page_size, sink_pages=0, recent_pages=0):
    batch, kv_heads, num_pages = page_indices.shape
    assert page_indices.dtype == torch.int32 and num_selected.dtype == torch.int32
    assert num_selected.shape == (batch, kv_heads)
    for b in range(batch):
        valid_pages = math.ceil(int(seqlens[b]) / page_size)
        last = valid_pages - 1
        forced = {last} | set(range(min(sink_pages, valid_pages))) | set(range(max(last - recent_pages, 0), last))
        for h in range(kv_heads):
            n = int(num_selected[b, h])
            chosen = page_indices[b, h, :n].tolist()
            assert 1 <= n <= valid_pages
            assert chosen == sorted(set(chosen)), "ascending, no duplicates"
            assert all(0 <= p < valid_pages for p in chosen), "nothing past seqlen"
            assert forced <= set(chosen), "forced pages always in"
            assert (page_indices[b, h, n:] == -1).all(), "-1 padding"


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    group=st.sampled_from([1, 4, 8]),
    kv_heads=st.integers(1, 2),
    nmax=st.integers(1, 80),
    page_size=st.sampled_from([1, 4, 16]),
    selector=st.sampled_from(["gaussian", "topk", "dense"]),
    alpha=st.sampled_from(ALPHAS),
    alibi=st.booleans(),
    sink_pages=st.integers(0, 2),
    recent_pages=st.integers(0, 2),
    budget_pages=st.integers(1, 6),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_selection_invariants(seed, group, kv_heads, nmax, page_size, selector, alpha, alibi, sink_pages,
                              recent_pages, budget_pages, dtype):
    q, _, seqlens, slopes, stats = make_case(seed, batch=3, kv_heads=kv_heads, group=group, nmax=nmax,
                                             page_size=page_size, dtype=dtype, alibi=alibi, score_scale=3.0)
    idx, num = run_select(q, stats, seqlens, slopes, selector=selector, alpha=alpha, sink_pages=sink_pages,
                          recent_pages=recent_pages, token_budget=budget_pages * page_size)
    assert_invariants(idx, num, seqlens, page_size, sink_pages, recent_pages)
    valid_pages = (seqlens + page_size - 1) // page_size
    if selector == "dense":
        assert torch.equal(num, valid_pages[:, None].expand_as(num).int())
    if selector == "topk":
        forced = torch.minimum(1 + torch.clamp(valid_pages - 1, max=recent_pages) +
                               torch.clamp(valid_pages - 1 - recent_pages, min=0).clamp(max=sink_pages),
                               valid_pages)
        within = forced <= budget_pages
        expected = torch.minimum(valid_pages, torch.tensor(budget_pages))
        assert torch.equal(num[within], expected[within, None].expand(-1, kv_heads).int())


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("group", [1, 4])
def test_quest_bound_bounds_every_score_and_is_tight_on_single_rows(alibi, group):
    q, k, seqlens, slopes, stats = make_case(3, batch=3, group=group, nmax=37, page_size=4, dtype=torch.float64,
                                             alibi=alibi)
    if alibi:
        slopes[0] = -0.5  # a negative slope: the page's largest bias is then at its first row
    scale = 0.37
    bounds = quest_bounds(q, stats.kmin, stats.kmax, seqlens, page_size=4, scale=scale, alibi_slopes=slopes)
    assert bounds.dtype == torch.float32 and bounds.shape == (3, 2 * group, 10)
    kq = k.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], kq) * scale
    rows = torch.arange(37)
    if alibi:
        scores = scores + slopes[None, :, None] * (rows[None, None, :] - (seqlens[:, None, None] - 1))
    for b in range(3):
        length = int(seqlens[b])
        for p in range(10):
            lo, hi = p * 4, min(p * 4 + 4, length)
            if lo >= length:
                assert torch.isinf(bounds[b, :, p]).all() and (bounds[b, :, p] < 0).all()
            else:
                assert (scores[b, :, lo:hi].amax(-1) <= bounds[b, :, p].double() + 1e-5).all()
    one = KVPageStats.from_cache(k, seqlens, 1)
    tight = quest_bounds(q, one.kmin, one.kmax, seqlens, page_size=1, scale=scale, alibi_slopes=slopes)
    inside = rows[None, None, :] < seqlens[:, None, None]
    torch.testing.assert_close(tight[inside.expand_as(tight)].double(), scores[inside.expand_as(scores)])


def test_topk_picks_the_group_max_bound_pages():
    q, k, seqlens, slopes, stats = make_case(11, batch=2, kv_heads=2, group=4, nmax=64, page_size=4,
                                             dtype=torch.float64, alibi=True)
    scale = 0.3
    idx, num = run_select(q, stats, seqlens, slopes, selector="topk", token_budget=5 * 4, sink_pages=1, scale=scale)
    bounds = quest_bounds(q, stats.kmin, stats.kmax, seqlens, page_size=4, scale=scale, alibi_slopes=slopes)
    group_max = bounds.view(2, 2, 4, -1).amax(2)
    for b in range(2):
        last = (int(seqlens[b]) - 1) // 4
        for h in range(2):
            forced = {0, last}
            rest = [p for p in group_max[b, h].argsort(descending=True).tolist()
                    if p not in forced and p <= last][: 5 - len(forced)]
            assert set(idx[b, h, : num[b, h]].tolist()) == forced | set(rest)


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_gaussian_is_the_union_over_the_query_group(alibi, alpha):
    group = 4
    q, _, seqlens, slopes, stats = make_case(5, batch=3, kv_heads=2, group=group, nmax=90, page_size=4,
                                             dtype=torch.float32, alibi=alibi, score_scale=4.0)
    idx, num = run_select(q, stats, seqlens, slopes, alpha=alpha)
    grouped = page_mask_from_indices(idx, num, stats.num_pages)
    union = torch.zeros_like(grouped)
    for g in range(group):
        q_g = q.view(3, 2, group, 1, -1)[:, :, g]
        slopes_g = slopes.view(2, group)[:, g].contiguous() if alibi else None
        i_g, n_g = run_select(q_g, stats, seqlens, slopes_g, alpha=alpha)
        union |= page_mask_from_indices(i_g, n_g, stats.num_pages)
    assert torch.equal(grouped, union)


def test_gaussian_finds_planted_pages_and_stays_sparse():
    gen = torch.Generator().manual_seed(21)
    batch, kv_heads, nmax, dim, page_size = 2, 2, 256, 16, 8
    q = torch.randn(batch, kv_heads, 1, dim, generator=gen)
    k = torch.randn(batch, kv_heads, nmax, dim, generator=gen) * 0.3
    planted = [3, 17, 25]
    for p in planted:
        k[:, :, p * page_size: p * page_size + 2] += 3.0 * q / q.norm(dim=-1, keepdim=True)
    seqlens = torch.tensor([nmax, 211])
    stats = KVPageStats.from_cache(k, seqlens, page_size)
    idx, num = run_select(q, stats, seqlens, scale=2.0, alpha=1.5)
    mask = page_mask_from_indices(idx, num, stats.num_pages)
    assert mask[:, :, planted].all()
    assert (num <= 16).all(), num  # at most half of the 32 pages: iid noise pages are mostly dropped


def test_margin_moves_the_selection_between_forced_and_dense():
    q, _, seqlens, _, stats = make_case(8, batch=2, nmax=60, page_size=4, score_scale=3.0)
    _, num_all = run_select(q, stats, seqlens, margin=1e6)
    _, num_forced = run_select(q, stats, seqlens, margin=-1e6, sink_pages=1)
    valid_pages = (seqlens + 3) // 4
    assert torch.equal(num_all, valid_pages[:, None].expand_as(num_all).int())
    assert torch.equal(num_forced, torch.minimum(valid_pages, torch.tensor(2))[:, None].expand_as(num_forced).int())


def test_auto_estimate_is_mixture_with_alibi_and_global_without():
    q, _, seqlens, slopes, stats = make_case(9, batch=2, nmax=70, page_size=4, alibi=True, score_scale=3.0)
    for slopes_, resolved in ((slopes, "mixture"), (None, "global")):
        auto = run_select(q, stats, seqlens, slopes_, tau_estimate="auto")
        explicit = run_select(q, stats, seqlens, slopes_, tau_estimate=resolved)
        assert all(torch.equal(a, e) for a, e in zip(auto, explicit))


def test_min_context_gives_short_sequences_every_page():
    q, _, _, _, stats = make_case(10, batch=2, nmax=64, page_size=4)
    seqlens = torch.tensor([64, 30])
    _, num = run_select(q, stats, seqlens, selector="topk", token_budget=4, min_context=31)
    assert num[0].tolist() == [1, 1] and num[1].tolist() == [8, 8]


def test_compaction_round_trip_and_token_mask():
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(3, 2, 7, generator=gen) > 0.5
    idx, num = compact_page_mask(mask)
    assert torch.equal(page_mask_from_indices(idx, num, 7), mask)
    assert torch.equal(num, mask.sum(-1).int())
    seqlens = torch.tensor([25, 7, 1])
    tokens = selected_token_mask(idx, num, seqlens, page_size=4, max_seqlen=26)
    expected = mask.repeat_interleave(4, -1)[..., :26] & (torch.arange(26) < seqlens[:, None])[:, None, :]
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(selector="certified"), ValueError, "selector"),
        (dict(tau_estimate="best"), ValueError, "tau_estimate"),
        (dict(alpha=1.0), ValueError, "alpha"),
        (dict(token_budget=2), ValueError, "token_budget"),
        (dict(max_quantile=1.0), ValueError, "max_quantile"),
        (dict(margin=float("nan")), ValueError, "margin"),
        (dict(sink_pages=-1), ValueError, "sink_pages"),
        (dict(recent_pages=1.5), TypeError, "recent_pages"),
        (dict(min_context=-2), ValueError, "min_context"),
        (dict(scale=-1.0), ValueError, "scale"),
    ],
)
def test_bad_selection_arguments_raise(overrides, error, match):
    q, _, seqlens, _, stats = make_case(0)
    with pytest.raises(error, match=match):
        run_select(q, stats, seqlens, **overrides)


def test_bad_tensors_raise():
    q, _, seqlens, _, stats = make_case(0, group=2)
    with pytest.raises(ValueError, match="multiple"):
        run_select(q[:, :3], stats, seqlens)
    with pytest.raises(ValueError, match="q must have shape"):
        run_select(q[:, :, :, None], stats, seqlens)
    with pytest.raises(ValueError, match="alibi_slopes"):
        run_select(q, stats, seqlens, torch.ones(3))
    with pytest.raises(TypeError, match="seqlens"):
        run_select(q, stats, seqlens.float())
    with pytest.raises(ValueError, match="page_size"):
        quest_bounds(q, stats.kmin, stats.kmax, seqlens, page_size=6, scale=1.0)


def test_topk_ranks_each_head_relative_to_its_best_page():
    """Under GQA a head with large raw scores must not take every top-k slot from its group."""
    batch, q_heads, kv_heads, nmax, dim, page = 1, 2, 1, 64, 4, 4
    kmin = torch.zeros(batch, kv_heads, nmax // page, dim)
    kmax = torch.zeros_like(kmin)
    kmax[0, 0, :, 0] = torch.arange(nmax // page, dtype=torch.float32)  # head 0: prefers late pages
    kmax[0, 0, :, 1] = 0.5 * (nmax // page - torch.arange(nmax // page, dtype=torch.float32))  # head 1: early
    q = torch.zeros(batch, q_heads, 1, dim)
    q[0, 0, 0, 0] = 100.0  # large raw bounds
    q[0, 1, 0, 1] = 1.0    # small raw bounds
    kmean, km2 = torch.zeros_like(kmin), torch.zeros_like(kmin)
    idx, num = select_pages(q, kmin, kmax, kmean, km2, torch.tensor([nmax]), page_size=page, alpha=1.5,
                            scale=1.0, selector="topk", token_budget=3 * page, max_quantile=0.99,
                            margin=0.0, tau_estimate="auto", sink_pages=0, recent_pages=0, min_context=0)
    chosen = set(idx[0, 0, : num[0, 0]].tolist())
    assert 0 in chosen and 15 in chosen  # each head keeps its own best page (15 is also the last)
