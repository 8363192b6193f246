"""reference.entmax / entmax_threshold against the PyPI entmax package and brute force."""

import itertools

import entmax as pypi_entmax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile import entmax, entmax_threshold

ALPHAS = [1.25, 4 / 3, 1.5, 2.0]


def brute_force_tau(z: torch.Tensor, alpha: float) -> float:
    """Exact tau of one row by trying every support size (float64, tiny rows only)."""
    beta = 1.0 / (alpha - 1.0)
    zs = sorted(z.tolist(), reverse=True)
    for k in range(1, len(zs) + 1):
        top = torch.tensor(zs[:k], dtype=torch.float64)
        lo, hi = top.max().item() - 1.0, top.min().item()
        for _ in range(200):  # bisection on the k-prefix equation
            mid = 0.5 * (lo + hi)
            if torch.clamp(top - mid, min=0).pow(beta).sum() > 1:
                lo = mid
            else:
                hi = mid
        tau = 0.5 * (lo + hi)
        nxt = zs[k] if k < len(zs) else float("-inf")
        if tau >= nxt and tau <= zs[k - 1]:
            return tau
    raise AssertionError("no consistent support size")


@pytest.mark.parametrize("shape,dim", [((5, 17), -1), ((3, 4, 9), 1), ((2, 1), -1), ((7, 64), 0)])
def test_matches_pypi_entmax15_and_sparsemax(shape, dim):
    x = torch.randn(shape, dtype=torch.float64) * 3
    torch.testing.assert_close(entmax(x, 1.5, dim), pypi_entmax.entmax15(x, dim=dim), atol=1e-6, rtol=0)
    torch.testing.assert_close(entmax(x, 2.0, dim), pypi_entmax.sparsemax(x, dim=dim), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [1.25, 4 / 3, 1.7, 2.5])
def test_matches_pypi_entmax_bisect(alpha):
    x = torch.randn(11, 33, dtype=torch.float64) * 2
    ref = pypi_entmax.entmax_bisect(x, alpha=alpha, n_iter=200)
    torch.testing.assert_close(entmax(x, alpha), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_threshold_matches_brute_force(alpha):
    gen = torch.Generator().manual_seed(int(alpha * 1000))
    x = torch.randn(6, 13, dtype=torch.float64, generator=gen) * 2.5
    tau = entmax_threshold(x, alpha)
    for row, t in zip(x, tau):
        assert abs(t.item() - brute_force_tau((alpha - 1) * row, alpha)) < 1e-9


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    alpha=st.sampled_from(ALPHAS + [3.0]),
    scale=st.floats(0.01, 30.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_rows_sum_to_one_with_exact_zeros(n, alpha, scale, seed):
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale
    p = entmax(x, alpha)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)
    tau = entmax_threshold(x, alpha).unsqueeze(-1)
    assert torch.equal(p == 0, (alpha - 1) * x <= tau)  # zeros exactly where z <= tau


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mask_and_neg_inf_are_excluded(alpha):
    x = torch.randn(5, 12, dtype=torch.float64)
    mask = torch.rand(5, 12) > 0.4
    mask[:, 3] = True
    p = entmax(x, alpha, mask=mask)
    assert torch.all(p[~mask] == 0)
    torch.testing.assert_close(p, entmax(x.masked_fill(~mask, float("-inf")), alpha))
    sub = entmax(x[0, mask[0]], alpha)
    torch.testing.assert_close(p[0, mask[0]], sub)


def test_all_masked_row_is_zero_and_nan_propagates():
    x = torch.randn(2, 5)
    p = entmax(x, 1.5, mask=torch.tensor([[False] * 5, [True] * 5]))
    assert torch.all(p[0] == 0) and torch.isinf(entmax_threshold(x, 1.5, mask=torch.zeros(2, 5, dtype=torch.bool))).all()
    x[1, 2] = float("nan")
    assert torch.isnan(entmax(x, 1.5)[1]).all()


@pytest.mark.parametrize("alpha,dtype", itertools.product(ALPHAS, [torch.float16, torch.bfloat16, torch.float32]))
def test_low_precision_dtypes(alpha, dtype):
    x = torch.randn(3, 50) * 4
    p = entmax(x.to(dtype), alpha)
    assert p.dtype == dtype
    ref = entmax(x.to(dtype).double(), alpha)
    # fp32 arithmetic: a few ulps of tau, amplified by beta-th powers, stay well under 1e-5
    torch.testing.assert_close(p.double(), ref, atol=2e-3 if dtype != torch.float32 else 1e-5, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient(alpha):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: entmax(t, alpha), (x,))
    if alpha in (1.5, 2.0):  # the PyPI package differentiates the same function
        dy = torch.randn(3, 7, dtype=torch.float64)
        ref_fn = pypi_entmax.entmax15 if alpha == 1.5 else pypi_entmax.sparsemax
        (g,) = torch.autograd.grad(entmax(x, alpha), x, dy)
        (g_ref,) = torch.autograd.grad(ref_fn(x, dim=-1), x, dy)
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(alpha=1.0), ValueError, "alpha must be > 1"),
        (dict(alpha=0.5), ValueError, "alpha must be > 1"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(alpha="1.5"), TypeError, "alpha"),
        (dict(dim=3), ValueError, "dim"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        entmax(torch.randn(2, 3), **kwargs)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        entmax(torch.arange(5), 1.5)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finfo_min_additive_mask_is_excluded(alpha, dtype):
    """HF-style masks add finfo.min to masked scores; prefix sums of those overflow to -inf."""
    x = torch.randn(3, 64, dtype=dtype)
    keep = torch.rand(3, 64) > 0.5
    keep[:, 0] = True
    masked = x + torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    p = entmax(masked, alpha)
    assert not torch.isnan(p).any() and torch.all(p[~keep] == 0)
    torch.testing.assert_close(p, entmax(x, alpha, mask=keep), atol=1e-3, rtol=0)
