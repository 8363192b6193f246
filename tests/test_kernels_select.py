"""Scoring, selection and certificate kernels against the references ``runtime/select/reference.py`` /
``runtime/certify/reference.py``.

CPU: Triton interpreter, tiny shapes. ``ENTMAXKV_KERNEL_TEST_DEVICE=cuda``: compiled, real shapes.
"""

import math

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE
from conftest import KERNEL_REAL_SHAPES as REAL

import triton
import triton.language as tl

from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.certify import reference as certify_reference
from entmaxkv_compile.runtime.select import reference as selection
from entmaxkv_compile.runtime.stats import reference as cache
from entmaxkv_compile.runtime.select.tau_hat import _gaussian_newton, single_gaussian_tau

pytestmark = pytest.mark.kernels


def _case(seed, batch, hq, hkv, nmax, dim, page, dtype, alibi):
    """Group-correlated queries and keys with a planted cluster of high scores (small support),
    ragged lengths."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, hkv, 1, 1, dim, generator=gen)
    q = base + 0.3 * torch.randn(batch, hkv, hq // hkv, 1, dim, generator=gen)
    q = q.reshape(batch, hq, 1, dim)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen)
    for b in range(batch):
        start = int(torch.randint(0, nmax - page, (1,), generator=gen))
        direction = base[b, :, 0, 0]
        direction = 8.0 * math.sqrt(dim) * direction / (direction * direction).sum(-1, keepdim=True)
        k[b, :, start:start + page] += direction[:, None, :]
    seqlens = torch.randint(nmax // 2, nmax + 1, (batch,), generator=gen, dtype=torch.int32)
    seqlens[0] = nmax
    to = dict(device=DEVICE, dtype=dtype)
    q, k = q.to(**to), k.to(**to)
    seqlens = seqlens.to(DEVICE)
    stats = cache.KVPageStats.from_cache(k, seqlens, page)
    slopes = (torch.rand(hq, generator=gen) * 0.05).to(DEVICE) if alibi else None
    return q, stats, seqlens, slopes


SMALL = (2, 8, 2, 150, 32, 8)   # batch, hq, hkv, nmax, dim, page (GQA 4, partial last page)
LARGE = (2, 32, 8, 16381, 128, 16)


def _select_kwargs(page, alpha, dim, selector, **over):
    kw = dict(page_size=page, alpha=alpha, scale=1 / math.sqrt(dim), selector=selector,
              token_budget=4 * page, max_quantile=0.99, margin=0.0, tau_estimate="auto",
              sink_pages=0, recent_pages=0, min_context=0)
    kw.update(over)
    return kw


@pytest.mark.parametrize("dtype, alibi", [(torch.float16, False), (torch.bfloat16, True),
                                          (torch.float32, True)])
def test_quest_bounds_match_reference(dtype, alibi):
    batch, hq, hkv, nmax, dim, page = LARGE if REAL else SMALL
    q, st, seqlens, slopes = _case(1, batch, hq, hkv, nmax, dim, page, dtype, alibi)
    kw = dict(page_size=page, scale=1 / math.sqrt(dim), alibi_slopes=slopes)
    ref = selection.quest_bounds(q, st.kmin, st.kmax, seqlens, **kw)
    got = kernels.quest_bounds(q, st.kmin, st.kmax, seqlens, **kw)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(ref[finite], got[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("selector, alpha, dtype, alibi, over", [
    ("dense", 1.5, torch.float32, False, {"min_context": 0}),
    ("topk", 1.5, torch.float16, False, {"sink_pages": 1, "recent_pages": 2}),
    ("topk", 2.0, torch.bfloat16, True, {}),
    ("gaussian", 1.5, torch.float16, False, {"tau_estimate": "global"}),
    ("gaussian", 4 / 3, torch.float32, False, {"recent_pages": 1}),
    ("gaussian", 2.0, torch.bfloat16, True, {"tau_estimate": "auto"}),  # ALiBi: mixture
    ("gaussian", 1.25, torch.float32, True, {"tau_estimate": "mixture", "margin": 0.05}),
])
def test_select_pages_matches_reference(selector, alpha, dtype, alibi, over):
    batch, hq, hkv, nmax, dim, page = LARGE if REAL else SMALL
    q, st, seqlens, slopes = _case(2, batch, hq, hkv, nmax, dim, page, dtype, alibi)
    budget = (nmax // 32) if REAL else 4 * page
    kw = _select_kwargs(page, alpha, dim, selector, token_budget=budget, **over)
    ref_idx, ref_n = selection.select_pages(q, *st.buffers(), seqlens, alibi_slopes=slopes, **kw)
    idx, n = kernels.select_pages(q, *st.buffers(), seqlens, alibi_slopes=slopes, **kw)
    valid_pages = -(-seqlens // page)
    assert (n >= 1).all() and (n <= valid_pages[:, None]).all()
    if selector == "gaussian":  # the estimate may differ in the last float bits: compare masks
        num_pages = st.num_pages
        ref_mask = selection.page_mask_from_indices(ref_idx, ref_n, num_pages)
        got_mask = selection.page_mask_from_indices(idx, n, num_pages)
        assert (ref_mask != got_mask).float().mean() <= 0.002
        assert (n < valid_pages[:, None]).any(), "the planted structure should make it sparse"
    else:
        assert torch.equal(idx, ref_idx) and torch.equal(n, ref_n)


@pytest.mark.parametrize("dtype, alibi, moments_dot, over", [
    (torch.float16, False, 0, {"tau_estimate": "global"}),
    (torch.bfloat16, True, 0, {"tau_estimate": "auto"}),  # ALiBi: mixture
    (torch.float16, False, 1, {"tau_estimate": "global", "recent_pages": 1}),
    (torch.float16, False, 2, {"tau_estimate": "global"}),
    (torch.bfloat16, True, 2, {"tau_estimate": "auto"}),
])
def test_gaussian_with_compact_moments_matches_reference(dtype, alibi, moments_dot, over):
    """fp16/bf16 kmean/km2 read by the kernel (every moment form: FMA, 16-row tf32x3 dots,
    one-pass dots) and by the reference selector give the same pages."""
    from entmaxkv_compile.runtime.tuning import tuned

    batch, hq, hkv, nmax, dim, page = LARGE if REAL else SMALL
    q, st, seqlens, slopes = _case(7, batch, hq, hkv, nmax, dim, page, dtype, alibi)
    k_like = torch.zeros(1, device=DEVICE, dtype=dtype)
    compact = cache.KVPageStats(st.kmin, st.kmax, st.kmean.to(k_like.dtype),
                                st.km2.to(k_like.dtype), page_size=page)
    kw = _select_kwargs(page, 1.5, dim, "gaussian", **over)
    ref_idx, ref_n = selection.select_pages(q, *compact.buffers(), seqlens, alibi_slopes=slopes,
                                            **kw)
    with tuned.override("select", {"MOMENTS_DOT": moments_dot}):
        idx, n = kernels.select_pages(q, *compact.buffers(), seqlens, alibi_slopes=slopes, **kw)
    ref_mask = selection.page_mask_from_indices(ref_idx, ref_n, st.num_pages)
    got_mask = selection.page_mask_from_indices(idx, n, st.num_pages)
    assert (ref_mask != got_mask).float().mean() <= 0.002
    assert (n < (-(-seqlens // page))[:, None]).any(), "the planted structure should make it sparse"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compact_moments_select_the_float32_pages_on_separated_data(dtype):
    """Planted pages far above a low-variance background: rounding the moments to the cache
    dtype changes no selected page (kernel and reference)."""
    batch, hq, hkv, nmax, dim, page = (2, 32, 8, 8192, 128, 16) if REAL else (2, 8, 2, 150, 32, 8)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(batch, hq, 1, dim, generator=gen)
    k = 0.05 * torch.randn(batch, hkv, nmax, dim, generator=gen)
    num_pages = -(-nmax // page)
    planted = torch.randperm(num_pages - 1, generator=gen)[:3]
    qg = q.reshape(batch, hkv, hq // hkv, dim).mean(2)
    for p in planted.tolist():
        k[:, :, p * page:(p + 1) * page] += 4.0 * qg[:, :, None, :] / qg.norm(dim=-1)[..., None, None]
    seqlens = torch.tensor([nmax, nmax - page // 2 - 1], dtype=torch.int32)
    q, k, seqlens = q.to(DEVICE, dtype), k.to(DEVICE, dtype), seqlens.to(DEVICE)
    full = cache.KVPageStats.from_cache(k, seqlens, page)
    compact = cache.KVPageStats.from_cache(k, seqlens, page, moment_dtype=dtype)
    kw = _select_kwargs(page, 1.5, dim, "gaussian", tau_estimate="global")
    want = selection.select_pages(q, *full.buffers(), seqlens, **kw)
    assert torch.equal(selection.select_pages(q, *compact.buffers(), seqlens, **kw)[0], want[0])
    for buffers in (full.buffers(), compact.buffers()):
        idx, n = kernels.select_pages(q, *buffers, seqlens, **kw)
        assert torch.equal(idx, want[0]) and torch.equal(n, want[1])
    assert (want[1] < (-(-seqlens // page))[:, None]).all() and (want[1] >= 2).all()


def test_a_page_past_float16_range_leaves_the_compact_selection_alone():
    """One finite outlier token whose page's M2 exceeds float16's 65504: the compact moments
    saturate there instead of holding +inf (which made the KV head's single-Gaussian estimate
    degenerate; see ``storable_m2``), and the selection equals the float32-moments one (kernel and
    reference)."""
    batch, hq, hkv, nmax, dim, page = (1, 32, 8, 8192, 128, 16) if REAL else (1, 8, 2, 150, 32, 8)
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(batch, hq, 1, dim, generator=gen)
    k = 0.05 * torch.randn(batch, hkv, nmax, dim, generator=gen)
    qg = q.reshape(batch, hkv, hq // hkv, dim).mean(2)
    k[:, :, 3 * page:4 * page] += 4.0 * qg[:, :, None, :] / qg.norm(dim=-1)[..., None, None]
    k[0, 0, 6 * page + 1] = 300.0  # M2 of page 6 ~ 300^2 * (P - 1) / P per coordinate
    seqlens = torch.tensor([nmax], dtype=torch.int32)
    q, k, seqlens = q.to(DEVICE, torch.float16), k.to(DEVICE, torch.float16), seqlens.to(DEVICE)
    full = cache.KVPageStats.from_cache(k, seqlens, page)
    compact = cache.KVPageStats.from_cache(k, seqlens, page, moment_dtype=torch.float16)
    assert float(full.km2[0, 0, 6].max()) > 65504 and torch.isfinite(compact.km2).all()
    assert float(compact.km2[0, 0, 6].max()) == 65504
    kernel_compact = cache.KVPageStats.from_cache(k, seqlens, page, moment_dtype=torch.float16)
    kernels.stats_prefill_(k, seqlens, page, *kernel_compact.buffers())
    assert torch.equal(kernel_compact.km2[0, 0, 6], compact.km2[0, 0, 6])
    kw = _select_kwargs(page, 1.5, dim, "gaussian", tau_estimate="global")
    want = selection.select_pages(q, *full.buffers(), seqlens, **kw)
    assert int(want[1][0, 0]) < -(-nmax // page)  # the outlier's head does not read every page
    assert torch.equal(selection.select_pages(q, *compact.buffers(), seqlens, **kw)[0], want[0])
    idx, n = kernels.select_pages(q, *kernel_compact.buffers(), seqlens, **kw)
    assert torch.equal(idx, want[0]) and torch.equal(n, want[1])


def test_min_context_selects_every_valid_page():
    batch, hq, hkv, nmax, dim, page = SMALL
    q, st, seqlens, _ = _case(3, batch, hq, hkv, nmax, dim, page, torch.float32, False)
    kw = _select_kwargs(page, 1.5, dim, "gaussian", min_context=nmax + 1)
    idx, n = kernels.select_pages(q, *st.buffers(), seqlens, **kw)
    assert torch.equal(n, (-(-seqlens // page)).to(torch.int32)[:, None].expand_as(n))


@pytest.mark.parametrize("alpha, dtype, alibi", [(1.5, torch.float16, False),
                                                 (4 / 3, torch.float32, True)])
def test_certify_matches_reference(alpha, dtype, alibi):
    batch, hq, hkv, nmax, dim, page = LARGE if REAL else SMALL
    q, st, seqlens, slopes = _case(4, batch, hq, hkv, nmax, dim, page, dtype, alibi)
    kw = _select_kwargs(page, alpha, dim, "topk")
    idx, n = selection.select_pages(q, *st.buffers(), seqlens, alibi_slopes=slopes, **kw)
    gen = torch.Generator().manual_seed(0)
    tau = (torch.randn(batch, hq, generator=gen) + 0.5).to(DEVICE)
    args = (q, st.kmin, st.kmax, seqlens, idx, n, tau)
    ckw = dict(page_size=page, alpha=alpha, scale=1 / math.sqrt(dim), alibi_slopes=slopes)
    ref_cert, ref_delta = certify_reference.certify(*args, **ckw)
    cert, delta = kernels.certify(*args, **ckw)
    assert torch.equal(cert, ref_cert)
    assert torch.allclose(delta, ref_delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha, dtype, alibi", [(1.5, torch.float16, False), (2.0, torch.float32, True),
                                                 (4 / 3, torch.bfloat16, False)])
def test_certify_pages_matches_reference(alpha, dtype, alibi):
    """The certified round's page flags: selected pages kept, violating pages added, read-all
    sequences read every valid page (without reading their bounds), a NaN key's page read and
    its heads' bounds reported not finite; the same pages as the reference."""
    batch, hq, hkv, nmax, dim, page = LARGE if REAL else SMALL
    q, st, seqlens, slopes = _case(7, batch, hq, hkv, nmax, dim, page, dtype, alibi)
    kw = _select_kwargs(page, alpha, dim, "topk")
    idx, n = selection.select_pages(q, *st.buffers(), seqlens, alibi_slopes=slopes, **kw)
    num_pages = st.kmin.shape[2]
    page_mask = selection.page_mask_from_indices(idx, n, num_pages)
    gen = torch.Generator().manual_seed(1)
    bounds = selection.quest_bounds(q, st.kmin, st.kmax, seqlens, page_size=page, scale=1 / math.sqrt(dim),
                                    alibi_slopes=slopes)
    # tau between the bounds' quantiles, so some pages violate and some clear; exactly on a bound
    # for one head (the comparison is <=: that page clears)
    finite = torch.where(torch.isfinite(bounds), bounds, float("nan"))
    tau = (alpha - 1) * finite.nanquantile(0.7, dim=-1).float()
    tau += 0.01 * torch.randn(tau.shape, generator=gen).to(DEVICE)
    read_all = torch.zeros(batch, dtype=torch.bool, device=DEVICE)
    read_all[-1] = True
    st.kmax[0, 0, 1, 2] = float("nan")  # page 1 of (0, KV head 0): read, its group's bounds not finite
    args = (q, st.kmin, st.kmax, seqlens, idx, n, tau, read_all)
    ckw = dict(page_size=page, alpha=alpha, scale=1 / math.sqrt(dim), alibi_slopes=slopes)
    want_idx, want_n, want_finite = certify_reference.certify_pages(*args, **ckw)
    got_idx, got_n, got_finite = kernels.certify_pages(*args, **ckw)
    assert torch.equal(got_n, want_n) and torch.equal(got_idx, want_idx)
    assert torch.equal(got_finite, want_finite)
    group = hq // hkv
    assert not got_finite[0, :group].any() and got_finite[0, group:].all() and got_finite[1:].all()
    got = selection.page_mask_from_indices(got_idx, got_n, num_pages)
    valid = selection.valid_page_mask(seqlens, page, num_pages)[:, None, :]
    assert torch.equal(got[-1], valid[-1].expand_as(got[-1]))  # read-all: every valid page
    assert (got | ~page_mask).all() and got[0, 0, 1]
    assert 0 < int(got[:-1].sum()) < int(valid[:-1].expand_as(got[:-1]).sum())  # some, not all


def test_certified_heads_and_policy_update_match_reference():
    from entmaxkv_compile.runtime.certify import policy

    gen = torch.Generator().manual_seed(3)
    tau = torch.randn(4, 6, generator=gen)
    tau[0, 1], tau[1, 2], tau[2, 0] = float("nan"), float("inf"), float("-inf")
    finite = torch.rand(4, 6, generator=gen) > 0.2
    seqlens = torch.tensor([0, 17, 64, 80])
    stats_ok = torch.tensor([True, True, False, True])
    args = [x.to(DEVICE) for x in (tau, finite, seqlens, stats_ok)]
    want = certify_reference.certified_heads(*args, capacity=64)
    got = kernels.certified_heads(*args, capacity=64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not got[0][[0, 2, 3]].any()  # empty, unsound statistics, beyond capacity
    skip = torch.tensor([0, 0, 5, 1], dtype=torch.int32, device=DEVICE)
    dense = skip > 0
    num_selected = torch.tensor([[1, 1], [2, 1], [4, 4], [0, 0]], dtype=torch.int32, device=DEVICE)
    kw = dict(page_size=16, num_pages=4, dense_above=0.5, probe_every=32)
    lengths = torch.tensor([64, 17, 64, 64], device=DEVICE)
    want_skip = skip.clone()
    policy.certify_policy_update_(want_skip, dense, num_selected, lengths, **kw)
    kernels.certify_policy_update_(skip, dense, num_selected, lengths, **kw)
    assert torch.equal(skip, want_skip) and skip.tolist() == [0, 31, 4, 0]


def test_select_bad_inputs_raise():
    batch, hq, hkv, nmax, dim, page = SMALL
    q, st, seqlens, _ = _case(5, batch, hq, hkv, nmax, dim, page, torch.float32, False)
    with pytest.raises(ValueError):
        kernels.select_pages(q, *st.buffers(), seqlens, **_select_kwargs(page, 1.5, dim, "bogus"))
    with pytest.raises(TypeError):
        kernels.select_pages(q.half(), *st.buffers(), seqlens,
                             **_select_kwargs(page, 1.5, dim, "dense"))
    with pytest.raises(ValueError):
        kernels.select_pages(q, *st.buffers(), seqlens,
                             **_select_kwargs(page, 1.5, dim, "topk", token_budget=page - 1))


@pytest.mark.parametrize("alpha, alibi, sketch", [(1.5, False, False), (2.0, True, False), (1.5, True, True)])
def test_certified_step_on_kernels_is_exact(alpha, alibi, sketch):
    """The certified step of ``step.run_step`` composed from the kernels (the Quest round, or the
    int8 key sketch's selection) equals full entmax and reports every head certified."""
    from entmaxkv_compile.runtime.sketch.reference import KeySketch
    from entmaxkv_compile import metrics
    from entmaxkv_compile.config import EntmaxKVConfig
    from entmaxkv_compile.runtime.step import run_step

    batch, hq, hkv, nmax, dim, page = LARGE if REAL else SMALL
    q, st, seqlens, slopes = _case(6, batch, hq, hkv, nmax, dim, page, torch.float32, alibi)
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen).to(DEVICE)
    v = torch.randn(batch, hkv, nmax, dim, generator=gen).to(DEVICE)
    k[:, :, :page] += 3.0 * q[:, :: hq // hkv, 0][:, :, None, :]  # a high-score first page
    st = cache.KVPageStats.from_cache(k, seqlens, page)
    config = EntmaxKVConfig(selector="certified", page_size=page, alpha=alpha,
                            certify_max_rounds=1)
    sketch_buffers = KeySketch.from_cache(k, seqlens).buffers() if sketch else None
    res = run_step(kernels, q, k, v, seqlens, st.buffers(), config, alpha=alpha,
                   scale=1 / math.sqrt(dim), alibi_slopes=slopes, sketch=sketch_buffers)
    full, _ = metrics.full_entmax_decode(q, k, v, seqlens, alpha, 1 / math.sqrt(dim), slopes)
    wide = [x.double() if x is not None else None for x in (q, k, v, slopes)]
    exact, _ = metrics.full_entmax_decode(*wide[:3], seqlens, alpha, 1 / math.sqrt(dim), wide[3])
    assert res.certified.all()
    # The boosted page puts tau near 37 in z units, where float32 rounding alone moves p by
    # ~4e-5 relative: as accurate as float32 full entmax (both against float64) is the bar.
    fp32_err = float(metrics.relative_error(full.double(), exact))
    assert float(metrics.relative_error(res.out.double(), exact)) <= 2 * fp32_err + 1e-5


@triton.jit
def _group_tau(mom_ptr, seqlens_ptr, tau_ptr, am1, log_gamma, log_m0, BETA: tl.constexpr,
               MAX_IT: tl.constexpr, G: tl.constexpr):
    """The selection's single-Gaussian tau_hat of the G heads of row ``program_id`` (one moment
    block each), solved together as the keep kernel does."""
    b = tl.program_id(0)
    heads = tl.arange(0, G)
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    tau = single_gaussian_tau(mom_ptr, length, seqlens_ptr, b, heads, heads < G, G, 1, am1, 1,
                              log_gamma, log_m0, False, BETA, 1, MAX_IT)
    tl.store(tau_ptr + b * G + heads, tau)


@triton.jit
def _cold_gaussian_tau(mom_ptr, seqlens_ptr, tau_ptr, am1, BETA: tl.constexpr,
                       MAX_IT: tl.constexpr, G: tl.constexpr):
    """The float64 Newton from the bracket's left end alone (no guess, no float32 pass), per
    (row, head)."""
    pid = tl.program_id(0)
    one = tl.arange(0, 1)
    n = tl.load(seqlens_ptr + pid // G + one * 0).to(tl.float64)
    mu = tl.load(mom_ptr + pid * 2 + one) / n
    var = tl.maximum(tl.load(mom_ptr + pid * 2 + 1 + one) / n - mu * mu, 0.0)
    s = am1 * tl.sqrt(var)
    center = am1 * mu
    lo = center - 1.0 - 8.0 * s
    hi = center + s * (tl.sqrt(2.0 * tl.log(n + 1.0)) + 8.0)
    t = _gaussian_newton(center, s, n, lo, hi, lo, BETA, MAX_IT, 1e-12, 1e-300, False)
    tl.store(tau_ptr + pid + one, t.to(tl.float32))


@pytest.mark.parametrize("alpha", [2.0, 1.5, 4 / 3, 1.25])
def test_gaussian_tau_matches_reference_threshold(alpha):
    """The selection's tau_hat (a guess, a float32 log-space pass, float64 log-space steps; four
    heads solved together, each lane stopping on its own) equals a cold float64 solve (plain
    Newton from the bracket's left end to its fixed point) to within one float32 ulp, and the
    reference's float64 solve within the erfc fit's accuracy, over a wide range of means,
    spreads and lengths (including a point mass and n = 1); an empty row gives +inf."""
    from entmaxkv_compile.math.gaussian import gaussian_threshold
    from entmaxkv_compile.runtime._common import integer_beta
    from entmaxkv_compile.runtime.select.tau_hat import MAX_ITERS, tail_constants

    gen = torch.Generator().manual_seed(9)
    rows, heads = 24, 4
    n = torch.randint(1, 2_000_000, (rows,), generator=gen)
    n[:3] = torch.tensor([1, 2, 17])
    mu = torch.randn(rows, heads, generator=gen, dtype=torch.float64) * 3
    sigma = torch.rand(rows, heads, generator=gen, dtype=torch.float64) * 4
    sigma[3, 1] = 0.0
    sigma[4, 2] = 1e-7
    # One moment block per head: s1 = n mu, s2 = n (sigma^2 + mu^2).
    nn = n[:, None].double()
    mom = torch.stack([nn * mu, nn * (sigma * sigma + mu * mu)], -1)[:, :, None, :].contiguous().to(DEVICE)
    tau = torch.empty(rows * heads, device=DEVICE, dtype=torch.float32)
    seqlens = n.to(torch.int32).to(DEVICE)
    beta = integer_beta(alpha)
    _group_tau[(rows,)](mom, seqlens, tau, alpha - 1.0, *tail_constants(beta), BETA=beta, MAX_IT=MAX_ITERS,
                        G=heads)
    cold = torch.empty_like(tau)
    _cold_gaussian_tau[(rows * heads,)](mom, seqlens, cold, alpha - 1.0, BETA=beta, MAX_IT=MAX_ITERS, G=heads)
    ulp = torch.abs(torch.nextafter(cold, torch.full_like(cold, math.inf)) - cold)
    assert (torch.abs(tau - cold) <= ulp).all(), "the guess must not move the float64 root"
    tau = tau.reshape(rows, heads)
    want = gaussian_threshold(mu, sigma, nn, alpha, check_values=False)
    # The kernel's erfc fit (1.2e-7 relative) is amplified in the far tail for beta 3 and 4
    # (n ~ 1e6, wide spread): up to ~4e-5 relative there, ~1e-6 for alpha 2 and 1.5.
    tol = 2e-6 if alpha >= 1.5 else 1e-4
    assert torch.allclose(tau.cpu().double(), want, rtol=tol, atol=tol)
    empty = torch.zeros(1, device=DEVICE, dtype=torch.int32)
    _group_tau[(1,)](mom, empty, tau, alpha - 1.0, *tail_constants(beta), BETA=beta, MAX_IT=MAX_ITERS, G=heads)
    assert torch.isinf(tau[0]).all() and (tau[0] > 0).all()


def _topk_lowest_id_ties(group, seqlens, page, budget_pages, sink, recent):
    """The documented top-k rule, brute force: forced pages (sink, recent, last), then the best
    others by group score, ties to the lowest page id; ascending page ids per (batch, KV head)."""
    out = []
    for b in range(group.shape[0]):
        last = (int(seqlens[b]) - 1) // page
        rows = []
        for h in range(group.shape[1]):
            forced = {p for p in range(last + 1) if p < sink or p >= last - recent}
            others = sorted((p for p in range(last + 1) if p not in forced),
                            key=lambda p: (-float(group[b, h, p]), p))
            rows.append(sorted(forced | set(others[:max(budget_pages - len(forced), 0)])))
        out.append(rows)
    return out


@pytest.mark.parametrize("budget_pages, over", [(40, {}), (7, {"sink_pages": 2, "recent_pages": 3}),
                                                (1, {}), (300, {})])
def test_topk_radix_select_with_ties(budget_pages, over):
    """Integer-valued keys make many pages' Quest bounds tie exactly (some negative), so the
    radix select must find the exact cut and break ties towards the lowest page id, as the
    reference does (a stable sort)."""
    gen = torch.Generator().manual_seed(budget_pages)
    batch, hq, hkv, nmax, dim, page = 2, 4, 2, 1997, 16, 8
    q = torch.randint(-2, 3, (batch, hq, 1, dim), generator=gen).float()
    k = torch.randint(-1, 2, (batch, hkv, nmax, dim), generator=gen).float()
    seqlens = torch.tensor([nmax, 1203], dtype=torch.int32)
    q, k, seqlens = q.to(DEVICE), k.to(DEVICE), seqlens.to(DEVICE)
    st = cache.KVPageStats.from_cache(k, seqlens, page)
    kw = _select_kwargs(page, 1.5, dim, "topk", token_budget=budget_pages * page, **over)
    ref_idx, ref_n = selection.select_pages(q, *st.buffers(), seqlens, **kw)
    idx, n = kernels.select_pages(q, *st.buffers(), seqlens, **kw)
    bounds = selection.quest_bounds(q, st.kmin, st.kmax, seqlens, page_size=page, scale=kw["scale"])
    group = selection.head_normalized_group_score(bounds, hkv).cpu()
    assert group.unique().numel() < group.numel() // 4, "the data should tie often"
    want = _topk_lowest_id_ties(group, seqlens.cpu(), page, budget_pages,
                                over.get("sink_pages", 0), over.get("recent_pages", 0))
    assert torch.equal(n, ref_n)
    for b in range(batch):
        for h in range(hkv):
            got = idx[b, h, :n[b, h]].cpu()
            assert got.tolist() == want[b][h]
            assert (idx[b, h, n[b, h]:] == -1).all()
            assert got.tolist() == ref_idx[b, h, :ref_n[b, h]].cpu().tolist()
