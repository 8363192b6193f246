"""A per-row first attended position (``row_start``, left-padded batches) through the decode step.

The references and the Triton kernels (interpreter, tiny shapes) must equal full entmax over
``[row_start, seqlens)`` only, computed here by brute force row by row; pages entirely below the
start are never selected; the certified step with starts is exact and certified.
"""

import math

import pytest
import torch

from conftest import on_kernel_device

from entmaxkv_compile import metrics
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.math.reference import entmax_probs_and_threshold
from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.attend import reference as attend_reference
from entmaxkv_compile.runtime.decode import sparse_decode
from entmaxkv_compile.runtime.select.reference import drop_pages_below_start
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.runtime.step import reference_implementation, run_step

PAGE = 8


def _case(seed, batch, hq, hkv, nmax, dim, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, dim, generator=gen) * 2
    k = torch.randn(batch, hkv, nmax, dim, generator=gen)
    v = torch.randn(batch, hkv, nmax, dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _full_entmax_window(q, k, v, seqlens, row_start, alpha, scale):
    """Brute force, float64: entmax over the scores of rows ``[row_start[b], seqlens[b])`` only.
    Returns ``out [B, Hq, 1, D]`` and the rows with nothing to attend (bool ``[B]``)."""
    batch, hq, _, dim = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, hq, 1, dim, dtype=torch.float64)
    empty = torch.zeros(batch, dtype=torch.bool)
    for b in range(batch):
        lo, hi = max(int(row_start[b]), 0), int(seqlens[b])
        if lo >= hi:
            empty[b] = True
            continue
        keys = k[b, :, lo:hi].double().repeat_interleave(group, 0)
        values = v[b, :, lo:hi].double().repeat_interleave(group, 0)
        p, _ = entmax_probs_and_threshold((q[b].double() @ keys.transpose(-1, -2)) * scale, alpha, dim=-1)
        out[b] = p @ values
    return out, empty


def _all_pages(batch, hkv, num_pages):
    idx = torch.arange(num_pages, dtype=torch.int32).repeat(batch, hkv, 1)
    return idx, torch.full((batch, hkv), num_pages, dtype=torch.int32)


# starts: inside a page, on a page boundary, 0, and past the whole cache row (nothing to attend)
STARTS = [(13, 0, 40), (16, 3, 0), (0, 21, 7)]


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("starts", STARTS)
def test_reference_decode_is_full_entmax_over_the_window(alpha, starts):
    batch, hq, hkv, nmax, dim = 3, 4, 2, 40, 16
    q, k, v = _case(1, batch, hq, hkv, nmax, dim, torch.float32)
    seqlens = torch.tensor([40, 29, 33], dtype=torch.int32)
    row_start = torch.tensor(starts, dtype=torch.int32)
    idx, nsel = _all_pages(batch, hkv, nmax // PAGE)
    scale = 1 / math.sqrt(dim)
    out, tau = attend_reference.paged_decode(q, k, v, seqlens, idx, nsel, page_size=PAGE, alpha=alpha, scale=scale,
                                             row_start=row_start)
    want, empty = _full_entmax_window(q, k, v, seqlens, row_start, alpha, scale)
    live = ~empty
    assert float(metrics.relative_error(out[live].double(), want[live])) < 1e-5
    assert bool((tau[empty] == float("inf")).all())  # a start past the row: nothing to attend
    plain, _ = attend_reference.paged_decode(q, k, v, seqlens, idx, nsel, page_size=PAGE, alpha=alpha, scale=scale)
    moved = row_start > 0
    assert not torch.allclose(plain[moved & live], out[moved & live])  # the start does change the result


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_decode_kernel_matches_reference_and_full_entmax(dtype, alpha):
    batch, hq, hkv, nmax, dim = 3, 4, 2, 40, 16
    q, k, v = _case(2, batch, hq, hkv, nmax, dim, dtype)
    seqlens = torch.tensor([40, 29, 33], dtype=torch.int32)
    row_start = torch.tensor([13, 0, 40], dtype=torch.int32)
    idx, nsel = _all_pages(batch, hkv, nmax // PAGE)
    kw = dict(page_size=PAGE, alpha=alpha, scale=1 / math.sqrt(dim), row_start=row_start)
    out, tau = on_kernel_device(kernels.paged_decode, q, k, v, seqlens, idx, nsel, **kw)
    ref_out, ref_tau = attend_reference.paged_decode(q, k, v, seqlens, idx, nsel, **kw)
    want, empty = _full_entmax_window(q, k, v, seqlens, row_start, alpha, kw["scale"])
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    live = ~empty
    assert float(metrics.relative_error(out[live].double(), want[live])) < tol
    assert float(metrics.relative_error(out[live].double(), ref_out[live].double())) < tol
    assert torch.allclose(tau[live], ref_tau[live], atol=1e-4)
    assert bool((tau[empty] == float("inf")).all())


def test_drop_pages_below_start_keeps_the_straddling_page():
    idx = torch.tensor([[[0, 1, 3, 4, -1], [2, 4, -1, -1, -1]]], dtype=torch.int32)
    nsel = torch.tensor([[4, 2]], dtype=torch.int32)
    kept, count = drop_pages_below_start(idx, nsel, torch.tensor([17]), PAGE)  # page 2 straddles row 17
    assert kept.tolist() == [[[3, 4, -1, -1, -1], [2, 4, -1, -1, -1]]]
    assert count.tolist() == [[2, 2]]
    same, same_count = drop_pages_below_start(idx, nsel, torch.tensor([0]), PAGE)
    assert torch.equal(same, idx) and torch.equal(same_count, nsel)


def _step(impl, q, k, v, seqlens, row_start, selector, alpha):
    config = EntmaxKVConfig(selector=selector, page_size=PAGE, alpha=alpha, token_budget=2 * PAGE)
    stats = KVPageStats.from_cache(k, seqlens, PAGE)
    return run_step(impl, q, k, v, seqlens, stats.buffers()[:4], config, alpha=alpha,
                    scale=1 / math.sqrt(q.shape[-1]), stats_valid=stats.valid_for(seqlens), row_start=row_start)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("selector", ["certified", "topk", "gaussian", "dense"])
def test_step_never_selects_pages_below_the_start(selector, alpha):
    batch, hq, hkv, nmax, dim = 3, 8, 2, 96, 16
    q, k, v = _case(3, batch, hq, hkv, nmax, dim, torch.float32)
    # padding keys that would dominate every bound and score if they were attended
    k[0, :, :37] = (q[0, :: hq // hkv, 0] * 4)[:, None, :]
    seqlens = torch.tensor([96, 70, 50], dtype=torch.int32)
    row_start = torch.tensor([37, 0, 16], dtype=torch.int32)
    result = _step(reference_implementation(), q, k, v, seqlens, row_start, selector, alpha)
    slots = torch.arange(result.page_indices.shape[-1])
    used = slots < result.num_selected[..., None]
    first_page = (row_start // PAGE)[:, None, None]
    assert bool((result.page_indices[used] >= first_page.expand_as(used)[used]).all())
    if selector == "topk":  # the budget (2 pages) is filled from the pages after the start
        assert bool((result.num_selected == 2).all())
    if selector in ("certified", "dense"):
        want, _ = _full_entmax_window(q, k, v, seqlens, row_start, alpha, 1 / math.sqrt(dim))
        assert bool(result.certified.all())
        assert float(metrics.relative_error(result.out.double(), want)) < 1e-5


def test_certified_step_with_a_start_past_the_row_is_never_certified():
    batch, hq, hkv, nmax, dim = 2, 4, 2, 32, 16
    q, k, v = _case(4, batch, hq, hkv, nmax, dim, torch.float32)
    seqlens = torch.tensor([32, 20], dtype=torch.int32)
    row_start = torch.tensor([5, 20], dtype=torch.int32)
    result = _step(reference_implementation(), q, k, v, seqlens, row_start, "certified", 1.5)
    assert bool(result.certified[0].all()) and not bool(result.certified[1].any())


@pytest.mark.kernels
@pytest.mark.parametrize("selector", ["certified", "topk"])
def test_kernel_step_matches_reference_step(selector):
    batch, hq, hkv, nmax, dim = 2, 4, 2, 64, 16
    q, k, v = _case(5, batch, hq, hkv, nmax, dim, torch.float32)
    k[0, :, :19] = (q[0, :: hq // hkv, 0] * 4)[:, None, :]  # padding that would win every ranking
    seqlens = torch.tensor([64, 45], dtype=torch.int32)
    row_start = torch.tensor([19, 8], dtype=torch.int32)
    ref = _step(reference_implementation(), q, k, v, seqlens, row_start, selector, 2.0)
    got = on_kernel_device(_step, kernels, q, k, v, seqlens, row_start, selector, 2.0)
    assert torch.equal(got.num_selected, ref.num_selected)
    assert torch.equal(got.certified, ref.certified)
    assert float(metrics.relative_error(got.out, ref.out)) < 1e-5


def test_sparse_decode_and_the_op_take_row_start():
    batch, hq, hkv, nmax, dim, alpha = 2, 4, 2, 40, 16, 1.5
    q, k, v = _case(6, batch, hq, hkv, nmax, dim, torch.float32)
    seqlens = torch.tensor([40, 31], dtype=torch.int32)
    row_start = torch.tensor([9, 2], dtype=torch.int32)
    scale = 1 / math.sqrt(dim)
    want, _ = _full_entmax_window(q, k, v, seqlens, row_start, alpha, scale)
    eager = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(selector="certified", page_size=PAGE), row_start=row_start)
    assert bool(eager.certified.all())
    assert float(metrics.relative_error(eager.out.double(), want)) < 1e-5
    stats = KVPageStats.from_cache(k, seqlens, PAGE).buffers()[:4]
    options = (scale, alpha, PAGE, "certified", 2 * PAGE, 0.99, 0.0, "global", 0, 0, 1, 0)
    op = torch.ops.entmaxkv.decode_step(q, k, v, seqlens, *stats, None, *options, row_start=row_start)
    assert bool(op[3].all())
    assert torch.equal(op[0], eager.out)
    with pytest.raises(ValueError, match="row_start must have shape"):
        sparse_decode(q, k, v, seqlens, row_start=row_start[:1])


def test_plugin_twin_refuses_row_start():
    from entmaxkv_compile.export import functional_ops

    graph = torch.fx.Graph()
    names = ["q", "k", "v", "seqlens", "kmin", "kmax", "kmean", "km2", "start"]
    q, k, v, seqlens, kmin, kmax, kmean, km2, start = (graph.placeholder(n) for n in names)
    options = (0.25, 1.5, PAGE, "certified", 2 * PAGE, 0.99, 0.0, "global", 0, 0, 1, 0)
    node = graph.call_function(torch.ops.entmaxkv.decode_step.default,
                               (q, k, v, seqlens, kmin, kmax, kmean, km2, None, *options),
                               {"row_start": start})
    with pytest.raises(ValueError, match="row_start"):
        functional_ops._decode_twin(graph, node)


# ----------------------------------------------------------------------- the backend's mask guard


def _padded_mask(starts, position, key_len=12, extra=4, bool_mask=False):
    """An HF decode mask ``[B, 1, 1, key_len + extra]``: row ``b`` shows keys ``starts[b]..position``."""
    keys = torch.arange(key_len + extra)
    shown = (keys[None, :] >= torch.tensor(starts)[:, None]) & (keys[None, :] <= position)
    shown = shown[:, None, None, :]
    return shown if bool_mask else torch.where(shown, 0.0, torch.finfo(torch.float32).min)


def _guard(prefix):
    from entmaxkv_compile.compiler.passes.guards import MaskGuard

    position = torch.fx.symbolic_trace(torch.nn.Identity())
    return MaskGuard(0, 12, position, (1,), "test mask", prefix)


@pytest.mark.parametrize("bool_mask", [False, True])
def test_row_start_from_mask_counts_the_leading_hidden_keys(bool_mask):
    from entmaxkv_compile.compiler.passes.guards import row_start_from_mask

    mask = _padded_mask([0, 3, 7], 9, bool_mask=bool_mask)
    assert row_start_from_mask(mask, 12, 3).tolist() == [0, 3, 7]
    assert row_start_from_mask(mask[:1], 12, 3).tolist() == [0, 0, 0]  # a mask broadcast over the batch


@pytest.mark.parametrize("bool_mask", [False, True])
def test_prefix_mask_guard_accepts_exactly_a_hidden_prefix(bool_mask):
    position = torch.tensor([9])
    padded = _padded_mask([0, 3], 9, bool_mask=bool_mask)
    assert _guard(True).holds((padded, position))
    assert not _guard(False).holds((padded, position))  # the plain guard: causal only
    assert _guard(True).holds((_padded_mask([0, 0], 9, bool_mask=bool_mask), position))
    hole = padded.clone()
    hole[1, ..., 5] = False if bool_mask else torch.finfo(torch.float32).min  # a hidden key after the start
    assert not _guard(True).holds((hole, position))
    future = padded.clone()
    future[0, ..., 10] = True if bool_mask else 0.0  # a key past the position shown
    assert not _guard(True).holds((future, position))
    assert not _guard(True).holds((_padded_mask([0, 10], 9, bool_mask=bool_mask), position))  # a row shows nothing


def _select(impl, q, k, seqlens, row_start, selector, slopes=None):
    stats = KVPageStats.from_cache(k, seqlens, PAGE).buffers()[:4]
    return on_kernel_device(impl.select_pages, q, *stats, seqlens, page_size=PAGE, alpha=1.5, scale=1 / math.sqrt(q.shape[-1]),
                             selector=selector, token_budget=3 * PAGE, max_quantile=0.9, margin=0.0,
                             tau_estimate="auto", sink_pages=1, recent_pages=0, min_context=0,
                             alibi_slopes=slopes, row_start=row_start)


def _hidden_pages_do_not_matter(impl, selector, alibi):
    """The selection ignores the content of the pages wholly below the start: replacing their keys
    (here by keys that would dominate every bound and estimate) changes nothing."""
    batch, hq, hkv, nmax, dim = 2, 4, 2, 96, 16
    q, k, _ = _case(7, batch, hq, hkv, nmax, dim, torch.float32)
    slopes = torch.rand(hq, generator=torch.Generator().manual_seed(8)) * 0.05 if alibi else None
    seqlens = torch.tensor([96, 80], dtype=torch.int32)
    row_start = torch.tensor([32, 16], dtype=torch.int32)  # on page boundaries: no straddling page
    loud = k.clone()
    loud[0, :, :32] = (q[0, :: hq // hkv, 0] * 6)[:, None, :]
    loud[1, :, :16] = -(q[1, :: hq // hkv, 0] * 6)[:, None, :]
    quiet = _select(impl, q, k, seqlens, row_start, selector, slopes)
    shouted = _select(impl, q, loud, seqlens, row_start, selector, slopes)
    assert torch.equal(quiet[0], shouted[0]) and torch.equal(quiet[1], shouted[1])
    used = torch.arange(quiet[0].shape[-1]) < quiet[1][..., None]
    assert bool((quiet[0][used] >= (row_start // PAGE)[:, None, None].expand_as(used)[used]).all())
    return quiet


@pytest.mark.parametrize("selector, alibi", [("gaussian", False), ("gaussian", True), ("topk", False),
                                             ("dense", False)])
def test_reference_selection_ignores_hidden_pages(selector, alibi):
    _hidden_pages_do_not_matter(reference_implementation(), selector, alibi)


@pytest.mark.kernels
@pytest.mark.parametrize("selector, alibi", [("gaussian", False), ("gaussian", True), ("topk", False),
                                             ("dense", False)])
def test_kernel_selection_ignores_hidden_pages_as_the_reference(selector, alibi):
    got = _hidden_pages_do_not_matter(kernels, selector, alibi)
    want = _hidden_pages_do_not_matter(reference_implementation(), selector, alibi)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
