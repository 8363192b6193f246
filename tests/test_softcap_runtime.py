"""Logit soft-capping (``c = cap * tanh(s / cap)``, Gemma-2 style) through the decode step.

The references and the Triton kernels (interpreter, tiny shapes) must equal full entmax over the
*capped* scores; the capped page bounds must stay upper bounds, so the certified step is exact.
"""

import math

import pytest
import torch

from conftest import on_kernel_device

from entmaxkv_compile import metrics
from entmaxkv_compile.checks import check_softcap
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.math.softcap import apply_softcap
from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.attend import reference as attend_reference
from entmaxkv_compile.runtime.decoder import Decoder
from entmaxkv_compile.runtime.select import reference as select_reference
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.runtime.step import reference_implementation, run_step


def _case(seed, batch, hq, hkv, nmax, dim, dtype, spread=3.0):
    """Random q/K/V with large scores (``spread`` widens them, so a small cap bends them)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, dim, generator=gen) * spread
    k = torch.randn(batch, hkv, nmax, dim, generator=gen) * spread
    v = torch.randn(batch, hkv, nmax, dim, generator=gen)
    seqlens = torch.randint(1, nmax + 1, (batch,), generator=gen, dtype=torch.int32)
    seqlens[0] = nmax
    return gen, q.to(dtype), k.to(dtype), v.to(dtype), seqlens


def _all_pages(seqlens, hkv, num_pages, page):
    batch = seqlens.shape[0]
    valid = -(-seqlens // page)
    idx = torch.arange(num_pages, dtype=torch.int32).repeat(batch, hkv, 1)
    idx = torch.where(idx < valid[:, None, None], idx, -1)
    return idx, valid.to(torch.int32)[:, None].repeat(1, hkv)


def test_apply_softcap_is_the_cap_and_keeps_non_finite_scores():
    x = torch.tensor([-1e9, -3.0, 0.0, 0.5, 40.0, float("-inf"), float("inf"), float("nan")], dtype=torch.float64)
    y = apply_softcap(x, 5.0)
    assert torch.allclose(y[:5], 5.0 * torch.tanh(x[:5] / 5.0))
    assert y[5] == float("-inf") and y[6] == float("inf") and torch.isnan(y[7])
    assert apply_softcap(x, 0.0) is x
    assert (torch.diff(y[:5]) > 0).all()  # increasing: bounds map to bounds


@pytest.mark.parametrize("bad, error", [(-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
                                        ("30", TypeError), (True, TypeError)])
def test_check_softcap_names_the_argument(bad, error):
    with pytest.raises(error, match="softcap"):
        check_softcap(bad)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("cap", [2.0, 30.0])
def test_reference_decode_is_full_entmax_of_capped_scores(alpha, cap):
    batch, hq, hkv, nmax, dim, page = 2, 4, 2, 37, 16, 8
    _, q, k, v, seqlens = _case(3, batch, hq, hkv, nmax, dim, torch.float64)
    idx, nsel = _all_pages(seqlens, hkv, -(-nmax // page), page)
    slopes = torch.tensor([0.0, 0.05, 0.1, 0.2], dtype=torch.float64)
    out, _ = attend_reference.paged_decode(q, k, v, seqlens, idx, nsel, page_size=page, alpha=alpha,
                                           scale=1 / math.sqrt(dim), alibi_slopes=slopes, softcap=cap)
    full, _ = metrics.full_entmax_decode(q, k, v, seqlens, alpha, 1 / math.sqrt(dim), slopes, softcap=cap)
    uncapped, _ = metrics.full_entmax_decode(q, k, v, seqlens, alpha, 1 / math.sqrt(dim), slopes)
    assert float(metrics.relative_error(out, full)) < 1e-12
    assert float(metrics.relative_error(uncapped, full)) > 1e-3  # the cap changes the answer here


SHAPES = [
    # batch, hq, hkv, nmax, dim, page, dtype, alpha, alibi, cap
    (2, 4, 4, 53, 16, 8, torch.float32, 1.5, False, 3.0),   # MHA, partial last page
    (2, 8, 2, 77, 24, 16, torch.float16, 2.0, True, 5.0),   # GQA 4, ALiBi
    (2, 4, 2, 40, 16, 8, torch.float32, 2.0, True, 30.0),   # GQA 2, a wide cap
    (1, 4, 1, 45, 16, 8, torch.float16, 1.5, False, 1.0),   # GQA 4, a tight cap
]


@pytest.mark.kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_kernel_matches_reference_and_full_entmax(shape):
    batch, hq, hkv, nmax, dim, page, dtype, alpha, alibi, cap = shape
    gen, q, k, v, seqlens = _case(len(str(shape)), batch, hq, hkv, nmax, dim, dtype)
    idx, nsel = _all_pages(seqlens, hkv, -(-nmax // page), page)
    slopes = (torch.rand(hq, generator=gen) * 0.1) if alibi else None
    kw = dict(page_size=page, alpha=alpha, scale=1 / math.sqrt(dim), alibi_slopes=slopes, softcap=cap)
    out, tau = on_kernel_device(kernels.paged_decode, q, k, v, seqlens, idx, nsel, **kw)
    ref_out, ref_tau = attend_reference.paged_decode(q, k, v, seqlens, idx, nsel, **kw)
    full, _ = metrics.full_entmax_decode(q.double(), k.double(), v.double(), seqlens, alpha, 1 / math.sqrt(dim),
                                         None if slopes is None else slopes.double(), softcap=cap)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert float(metrics.relative_error(out.float(), ref_out.float())) < tol
    assert float(metrics.relative_error(out.double(), full)) < tol
    assert torch.allclose(tau, ref_tau, rtol=1e-4, atol=1e-4)


@pytest.mark.kernels
def test_kernel_bounds_are_the_capped_reference_bounds():
    batch, hq, hkv, nmax, dim, page, cap = 2, 8, 2, 61, 16, 8, 4.0
    gen, q, k, _, seqlens = _case(5, batch, hq, hkv, nmax, dim, torch.float32)
    stats = KVPageStats.from_cache(k, seqlens, page)
    kmin, kmax = stats.kmin, stats.kmax
    slopes = torch.rand(hq, generator=gen) * 0.1
    kw = dict(page_size=page, scale=1 / math.sqrt(dim), alibi_slopes=slopes)
    raw = select_reference.quest_bounds(q, kmin, kmax, seqlens, **kw)
    capped = select_reference.quest_bounds(q, kmin, kmax, seqlens, softcap=cap, **kw)
    assert torch.equal(capped, apply_softcap(raw, cap))
    assert torch.allclose(on_kernel_device(kernels.quest_bounds, q, kmin, kmax, seqlens, softcap=cap, **kw), capped, atol=1e-5)
    # every capped score lies under its page's capped bound
    raw_scores = (q.reshape(batch, hkv, hq // hkv, dim) @ k.transpose(-1, -2)).reshape(batch, hq, nmax) * kw["scale"]
    scores = apply_softcap(raw_scores + slopes[None, :, None] * (torch.arange(nmax)[None, :] - (seqlens[:, None] - 1))
                           [:, None, :], cap)
    valid = torch.arange(nmax)[None, None, :] < seqlens[:, None, None]
    per_token_bound = capped.repeat_interleave(page, dim=-1)[..., :nmax]
    assert bool((~valid | (scores <= per_token_bound + 1e-5)).all())
    # ... which raw bounds are not: where a steep ALiBi makes pages negative, the cap lifts their
    # scores above their raw bound (so a certificate on raw bounds could drop support)
    steep = dict(kw, alibi_slopes=torch.full((hq,), 2.0))
    raw_steep = select_reference.quest_bounds(q, kmin, kmax, seqlens, **steep)
    capped_steep = select_reference.quest_bounds(q, kmin, kmax, seqlens, softcap=cap, **steep)
    rel = (torch.arange(nmax)[None, :] - (seqlens[:, None] - 1))[:, None, :]
    steep_scores = apply_softcap(raw_scores + 2.0 * rel, cap)
    assert bool((~valid | (steep_scores <= capped_steep.repeat_interleave(page, dim=-1)[..., :nmax] + 1e-5)).all())
    assert not bool((~valid | (steep_scores <= raw_steep.repeat_interleave(page, dim=-1)[..., :nmax] + 1e-5)).all())
    # the certified round's page choice (kernel) equals the reference's at a threshold that bites
    finite = torch.where(torch.isfinite(capped), capped, float("nan"))
    tau = 0.5 * finite.nanquantile(0.3, dim=-1) + 1e-3  # inside the spread, off every bound
    idx, nsel = _all_pages(torch.ones_like(seqlens), hkv, kmin.shape[2], page)
    read_all = torch.zeros(batch, dtype=torch.bool)
    geometry = dict(alpha=1.5, softcap=cap, **kw)
    ref = reference_implementation().certify_pages(q, kmin, kmax, seqlens, idx, nsel, tau, read_all, **geometry)
    got = on_kernel_device(kernels.certify_pages, q, kmin, kmax, seqlens, idx, nsel, tau, read_all, **geometry)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    uncapped = reference_implementation().certify_pages(q, kmin, kmax, seqlens, idx, nsel, tau, read_all,
                                                        **{**geometry, "softcap": 0.0})
    assert not torch.equal(uncapped[1], ref[1])  # the cap changes which pages violate


def _step(impl, q, k, v, seqlens, selector, alpha, cap, slopes=None, page=8):
    config = EntmaxKVConfig(selector=selector, page_size=page, alpha=alpha, token_budget=2 * page,
                            report_bound=selector != "certified")  # approximate selectors: the capped certificate
    stats = KVPageStats.from_cache(k, seqlens, page)
    return run_step(impl, q, k, v, seqlens, stats.buffers()[:4], config, alpha=alpha,
                    scale=1 / math.sqrt(q.shape[-1]), alibi_slopes=slopes, softcap=cap,
                    stats_valid=stats.valid_for(seqlens))


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("cap", [1.5, 30.0])
def test_certified_step_equals_full_entmax_of_capped_scores(alpha, cap):
    batch, hq, hkv, nmax, dim = 2, 8, 2, 96, 16
    gen, q, k, v, seqlens = _case(11, batch, hq, hkv, nmax, dim, torch.float32)
    slopes = torch.rand(hq, generator=gen) * 0.05
    result = _step(reference_implementation(), q, k, v, seqlens, "certified", alpha, cap, slopes)
    full, _ = metrics.full_entmax_decode(q.double(), k.double(), v.double(), seqlens, alpha, 1 / math.sqrt(dim),
                                         slopes.double(), softcap=cap)
    assert bool(result.certified.all())
    assert float(metrics.relative_error(result.out.double(), full)) < 1e-5


@pytest.mark.kernels
@pytest.mark.parametrize("selector", ["certified", "topk", "gaussian"])
def test_kernel_step_matches_reference_step(selector):
    batch, hq, hkv, nmax, dim, cap = 2, 4, 2, 64, 16, 2.0
    _, q, k, v, seqlens = _case(13, batch, hq, hkv, nmax, dim, torch.float32)
    ref = _step(reference_implementation(), q, k, v, seqlens, selector, 1.5, cap)
    got = on_kernel_device(_step, kernels, q, k, v, seqlens, selector, 1.5, cap)
    assert torch.equal(got.num_selected, ref.num_selected)
    assert torch.equal(got.certified, ref.certified)
    assert torch.allclose(got.delta_bound, ref.delta_bound, atol=1e-5)
    assert float(metrics.relative_error(got.out, ref.out)) < 1e-5


def test_sketch_refuses_a_soft_cap():
    with pytest.raises(ValueError, match="softcap=30.0: the key sketch"):
        Decoder(EntmaxKVConfig(selector="certified", certify_sketch="int8"), batch=1, q_heads=2, kv_heads=1,
                head_dim=8, capacity=32, dtype=torch.float32, device="cpu", softcap=30.0)


def test_decode_step_op_and_its_plugin_twin_take_the_cap_last():
    from entmaxkv_compile.export import functional_ops  # noqa: F401  (registers decode_step_plugin)

    batch, hq, hkv, nmax, dim, page, alpha, cap = 2, 4, 2, 40, 16, 8, 1.5, 2.0
    _, q, k, v, seqlens = _case(17, batch, hq, hkv, nmax, dim, torch.float32)
    stats = KVPageStats.from_cache(k, seqlens, page).buffers()[:4]
    scale = 1 / math.sqrt(dim)
    options = (scale, alpha, page, "certified", 2 * page, 0.99, 0.0, "global", 0, 0, 1, 0)
    capped = torch.ops.entmaxkv.decode_step(q, k, v, seqlens, *stats, None, *options, softcap=cap)
    plain = torch.ops.entmaxkv.decode_step(q, k, v, seqlens, *stats, None, *options)  # binds as before the cap
    twin = torch.ops.entmaxkv.decode_step_plugin(q, k, v, seqlens, *stats, torch.zeros(hq), *options, cap)
    want, _ = metrics.full_entmax_decode(q.double(), k.double(), v.double(), seqlens, alpha, scale, softcap=cap)
    want_plain, _ = metrics.full_entmax_decode(q.double(), k.double(), v.double(), seqlens, alpha, scale)
    assert bool(capped[3].all()) and bool(plain[3].all())
    assert float(metrics.relative_error(capped[0].double(), want)) < 1e-5
    assert float(metrics.relative_error(plain[0].double(), want_plain)) < 1e-5
    assert torch.equal(twin[0], capped[0])
