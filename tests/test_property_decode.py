"""Property tests of the decode step on random inputs, non-finite values, extreme score offsets,
lengths 0 / 1 / capacity and every selector.

The property: ``certified == True`` implies the output equals full entmax attention computed in
float64 by an independent oracle (the PyPI ``entmax`` package's bisection), on every path:

- the public ``sparse_decode`` (whatever implementation it runs on this device);
- the Triton kernels (CPU interpreter here), strung together through their public functions
  ``select_pages -> paged_decode -> certify``, also compared with the reference functions on the
  same page table.

Shapes are tiny and ``max_examples`` bounded so the whole file runs in about a minute on a CPU.
"""

from __future__ import annotations

import entmax as pypi_entmax
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entmaxkv_compile import EntmaxKVConfig, KVPageStats, sparse_decode
from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.attend import reference as attend_reference
from entmaxkv_compile.runtime.certify import reference as certify_reference

NAN, INF = float("nan"), float("inf")
DIM, SCALE = 16, 0.25
SELECTORS = ["gaussian", "topk", "certified", "dense"]
ALPHAS = [1.25, 4 / 3, 1.5, 1.75, 2.0]
POISONS = ["none", "k_nan", "k_pos_inf", "k_neg_inf", "q_nan", "slope_nan"]


@st.composite
def decode_cases(draw, allow_empty: bool = True):
    """One random decode step: shapes, lengths, a common score offset, ALiBi, one poison."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2]))
    page_size = draw(st.sampled_from([8, 16]))
    nmax = draw(st.sampled_from([16, 40]))
    lengths = st.sampled_from([1, nmax]) | st.integers(0 if allow_empty else 1, nmax)
    seqlens = torch.tensor([draw(lengths) for _ in range(batch)])
    offset = draw(st.sampled_from([0.0, 30.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    hq = kv_heads * group
    q = torch.randn(batch, hq, 1, DIM, generator=gen)
    k = torch.randn(batch, kv_heads, nmax, DIM, generator=gen)
    v = torch.randn(batch, kv_heads, nmax, DIM, generator=gen)
    if draw(st.booleans()):  # a planted cluster: small supports, so the selectors have work to do
        k = k + 2.5 * q.reshape(batch, kv_heads, group, DIM)[:, :, :1] * (torch.rand(batch, kv_heads, nmax, 1,
                                                                                      generator=gen) < 0.1)
    # a large score offset shared by every token: q_0 = 1 and K_0 shifted by offset / scale
    q[..., 0] = 1.0
    k[..., 0] += offset / SCALE
    slopes = torch.rand(hq, generator=gen) * 0.5 if draw(st.booleans()) else None
    poison = draw(st.sampled_from(POISONS))
    b, row = 0, max(int(seqlens[0]) - 1, 0)
    if poison.startswith("k_"):
        k[b, 0, row, 3] = {"k_nan": NAN, "k_pos_inf": INF, "k_neg_inf": -INF}[poison]
    elif poison == "q_nan":
        q[b, 0, 0, 5] = NAN
    elif poison == "slope_nan":
        slopes = torch.rand(hq, generator=gen) * 0.5
        slopes[0] = NAN
    config = EntmaxKVConfig(selector=draw(st.sampled_from(SELECTORS)), page_size=page_size,
                            token_budget=page_size * draw(st.integers(1, 2)), alpha=draw(st.sampled_from(ALPHAS)),
                            report_bound=True)
    return q, k, v, seqlens, slopes, config, offset


def full_entmax64(q, k, v, seqlens, slopes, alpha):
    """Dense entmax attention in float64 by the PyPI package's bisection: ``out [B, Hq, D]``,
    ``poisoned [B, Hq]`` (an attended score is NaN or +inf: no finite answer exists) and ``empty
    [B, Hq]`` (no attended score above -inf: nothing to attend)."""
    batch, hq = q.shape[:2]
    group = hq // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), kk) * SCALE
    rows = torch.arange(k.shape[2])
    if slopes is not None:
        scores = scores + slopes.double()[None, :, None] * (rows[None, :] - (seqlens[:, None] - 1)).double()[:, None]
    attended = (rows[None, :] < seqlens[:, None])[:, None, :].expand_as(scores)
    poisoned = (attended & (torch.isnan(scores) | (scores == INF))).any(-1)
    clean = torch.where(attended & ~poisoned[..., None] & ~torch.isnan(scores), scores, -INF)
    p = pypi_entmax.entmax_bisect(clean, alpha=alpha, dim=-1, n_iter=100)
    p = torch.where(clean > -INF, p, 0.0)
    out = torch.einsum("bhn,bhnd->bhd", p, torch.where(p[..., None] > 0, vv, 0.0))
    return out, poisoned, ~poisoned & (clean == -INF).all(-1)


def tolerance(offset: float) -> float:
    """float32 scores of magnitude ``offset`` carry ~``offset * 2^-20`` of rounding into p."""
    return 2e-4 + 1e-5 * offset


def check_certified_is_exact(out, certified, delta, q, k, v, seqlens, slopes, alpha, offset):
    """``certified`` implies equality with float64 full entmax; never certified on a non-finite
    input or an empty sequence; ``delta_bound`` in [0, 1]."""
    exact, poisoned, empty = full_entmax64(q, k, v, seqlens, slopes, alpha)
    assert not certified[poisoned | empty].any()
    nonfinite_input = ~torch.isfinite(q[:, :, 0]).all(-1)
    if slopes is not None:
        nonfinite_input |= ~torch.isfinite(slopes)[None, :]
    assert not certified[nonfinite_input].any()
    assert ((delta >= 0) & (delta <= 1)).all()
    if certified.any():
        torch.testing.assert_close(out[:, :, 0][certified].double(), exact[certified],
                                   atol=tolerance(offset), rtol=0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=decode_cases())
def test_sparse_decode_certified_means_exact(case):
    q, k, v, seqlens, slopes, config, offset = case
    result = sparse_decode(q, k, v, seqlens, config, alibi_slopes=slopes, scale=SCALE, check_values=False)
    check_certified_is_exact(result.out, result.certified, result.delta_bound, q, k, v, seqlens, slopes,
                             config.alpha, offset)
    # the poisoned row is the last one, in the always-attended last page: NaN exactly there
    _, poisoned, empty = full_entmax64(q, k, v, seqlens, slopes, config.alpha)
    assert torch.equal(torch.isnan(result.out[:, :, 0]).any(-1), poisoned)
    assert torch.equal(torch.isnan(result.tau), poisoned)
    assert (result.out[:, :, 0][empty] == 0).all() and (result.tau[empty] == INF).all()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=decode_cases(allow_empty=False))
def test_kernels_certified_means_exact_and_match_the_reference(case):
    q, k, v, seqlens, slopes, config, offset = case
    selector = "gaussian" if config.selector == "certified" else config.selector
    page_size, alpha = config.page_size, config.alpha
    stats = KVPageStats.allocate(*k.shape, page_size=page_size)
    kernels.stats_prefill_(k, seqlens, page_size, *stats.buffers())
    indices, count = kernels.select_pages(
        q, *stats.buffers(), seqlens, page_size=page_size, alpha=alpha, scale=SCALE, selector=selector,
        token_budget=config.token_budget, max_quantile=config.max_quantile, margin=config.margin,
        tau_estimate=config.tau_estimate, sink_pages=0, recent_pages=0, min_context=0, alibi_slopes=slopes)
    geometry = dict(page_size=page_size, alpha=alpha, scale=SCALE, alibi_slopes=slopes)
    out, tau = kernels.paged_decode(q, k, v, seqlens, indices, count, **geometry)
    ref_out, ref_tau = attend_reference.paged_decode(q, k, v, seqlens, indices, count, **geometry)
    certified, delta = kernels.certify(q, stats.kmin, stats.kmax, seqlens, indices, count, tau, **geometry)
    ref_certified, ref_delta = certify_reference.certify(q, stats.kmin, stats.kmax, seqlens, indices, count, tau, **geometry)
    check_certified_is_exact(out, certified, delta, q, k, v, seqlens, slopes, alpha, offset)
    check_certified_is_exact(ref_out, ref_certified, ref_delta, q, k, v, seqlens, slopes, alpha, offset)
    _, poisoned, empty = full_entmax64(q, k, v, seqlens, slopes, alpha)
    clean = ~poisoned & ~empty  # the decode kernel's answers there: test_decode_kernel_follows_the_nonfinite_rule
    torch.testing.assert_close(out[:, :, 0][clean], ref_out[:, :, 0][clean], atol=tolerance(offset), rtol=0)
    torch.testing.assert_close(tau[clean], ref_tau[clean].float(), atol=tolerance(offset), rtol=1e-5)
    if selector == "dense":  # every page attended: certified wherever the inputs are finite
        finite = clean & torch.isfinite(k).all(-1).all(-1).all(-1)[:, None]
        assert certified[finite].all() and ref_certified[finite].all()


@pytest.mark.parametrize("poison", ["k_nan", "k_pos_inf", "slope_nan", "empty"])
def test_decode_kernel_follows_the_nonfinite_rule(poison):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 1, DIM, generator=gen)
    k = torch.randn(1, 1, 32, DIM, generator=gen)
    v = torch.randn(1, 1, 32, DIM, generator=gen)
    q[0, :, 0, 3] = 1.0
    seqlens, slopes = torch.tensor([32]), None
    if poison == "k_nan":
        k[0, 0, 20, 3] = NAN
    elif poison == "k_pos_inf":
        k[0, 0, 20, 3] = INF
    elif poison == "slope_nan":
        slopes = torch.tensor([NAN, 0.1])
    else:
        seqlens = torch.tensor([0])
    indices = torch.tensor([[[0, 1]]], dtype=torch.int32)
    count = torch.tensor([[2]], dtype=torch.int32)
    geometry = dict(page_size=16, alpha=1.5, scale=SCALE, alibi_slopes=slopes)
    out, tau = kernels.paged_decode(q, k, v, seqlens, indices, count, **geometry)
    ref_out, ref_tau = attend_reference.paged_decode(q, k, v, seqlens, indices, count, **geometry)
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    torch.testing.assert_close(tau, ref_tau, equal_nan=True)
