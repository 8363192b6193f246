"""Scoring, selection and certificate kernels against the reference ``selection.py`` /
``decode.py``.

CPU: Triton interpreter, tiny shapes. ``ENTMAXKV_KERNEL_TEST_DEVICE=cuda``: compiled, real shapes.
"""

import math
import os

DEVICE = os.environ.get("ENTMAXKV_KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from entmaxkv_compile import cache, decode, kernels, selection  # noqa: E402

pytestmark = pytest.mark.skipif(
    not kernels.available(DEVICE),
    reason=f"Triton kernels cannot run on {DEVICE} (on a CPU, TRITON_INTERPRET=1 must be set "
           "before anything imports triton)",
)
REAL = DEVICE != "cpu"


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
    ref_cert, ref_delta = decode.certify(*args, **ckw)
    cert, delta = kernels.certify(*args, **ckw)
    assert torch.equal(cert, ref_cert)
    assert torch.allclose(delta, ref_delta, rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("alpha, alibi", [(1.5, False), (2.0, True)])
def test_certified_step_on_kernels_is_exact(alpha, alibi):
    """The certified loop of ``step.run_step`` composed from the kernels equals full entmax and
    reports every head certified."""
    from entmaxkv_compile import metrics
    from entmaxkv_compile.config import EntmaxKVConfig
    from entmaxkv_compile.step import run_step

    batch, hq, hkv, nmax, dim, page = LARGE if REAL else SMALL
    q, st, seqlens, slopes = _case(6, batch, hq, hkv, nmax, dim, page, torch.float32, alibi)
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen).to(DEVICE)
    v = torch.randn(batch, hkv, nmax, dim, generator=gen).to(DEVICE)
    k[:, :, :page] += 3.0 * q[:, :: hq // hkv, 0][:, :, None, :]  # a high-score first page
    st = cache.KVPageStats.from_cache(k, seqlens, page)
    config = EntmaxKVConfig(selector="certified", page_size=page, alpha=alpha,
                            certify_max_rounds=1)
    res = run_step(kernels, q, k, v, seqlens, st.buffers(), config, alpha=alpha,
                   scale=1 / math.sqrt(dim), alibi_slopes=slopes)
    full, _ = metrics.full_entmax_decode(q, k, v, seqlens, alpha, 1 / math.sqrt(dim), slopes)
    assert res.certified.all()
    assert float(metrics.relative_error(res.out, full)) < 1e-5
