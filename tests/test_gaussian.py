"""Tests of the Gaussian threshold estimates (entmaxkv_compile.math.gaussian) and the generated moments."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile.math.gaussian import (
    gaussian_threshold,
    mixture_threshold,
    page_max_quantile_z,
    truncated_moment,
    truncated_power_moment,
)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
ALPHAS = [1.25, 4 / 3, 1.5, 2.0, 3.0]


def _simpson(values: torch.Tensor, h: float) -> torch.Tensor:
    """Composite Simpson rule over the last axis (odd number of points)."""
    w = torch.ones(values.shape[-1], dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return (values * w).sum(-1) * h / 3


def _integrated_moment(order: float, m: float, s: float, points: int = 40001) -> float:
    """E[Y_+^order], Y ~ N(m, s^2), by Simpson in w where y = U w^p, p = 4 / (order + 1).

    Then y^order dy = p U^(order+1) w^3 dw: the power's singularity at y = 0 is gone.
    """
    upper = max(m, 0.0) + 14 * s
    power = 4.0 / (order + 1)
    w = torch.linspace(0, 1, points, dtype=F64)
    y = upper * w**power
    density = torch.exp(-0.5 * ((y - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    integrand = power * upper ** (order + 1) * w**3 * density
    return float(_simpson(integrand, 1.0 / (points - 1)))


def _moment(order: float, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return truncated_power_moment(order, m.to(F64), s.to(F64))


# ----------------------------------------------------------------------------- generated module


def test_generated_moments_are_up_to_date():
    script = ROOT / "tools" / "gen_truncated_moments.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- moments


@pytest.mark.parametrize("k", range(5))
def test_closed_forms_match_numerical_integration(k):
    gen = torch.Generator().manual_seed(100 + k)
    for _ in range(6):
        m = float(torch.randn((), generator=gen, dtype=F64) * 3)
        s = float(torch.rand((), generator=gen, dtype=F64) * 3 + 0.05)
        got = float(truncated_moment(k, torch.tensor(m, dtype=F64), torch.tensor(s, dtype=F64)))
        assert got == pytest.approx(_integrated_moment(k, m, s), rel=1e-9, abs=1e-300), (m, s)


@pytest.mark.parametrize("k", range(5))
def test_closed_forms_match_monte_carlo(k):
    gen = torch.Generator().manual_seed(200 + k)
    m, s = torch.tensor([-0.7, 0.4, 1.9], dtype=F64), torch.tensor([1.3, 0.6, 2.2], dtype=F64)
    x = m[:, None] + s[:, None] * torch.randn(3, 10**6, generator=gen, dtype=F64)
    y = torch.where(x > 0, x.clamp_min(0) ** k, 0.0)  # Y_+^0 is the indicator of Y > 0
    stderr = y.std(-1) / math.sqrt(y.shape[-1])
    assert ((truncated_moment(k, m, s) - y.mean(-1)).abs() < 5 * stderr + 1e-12).all()


def test_third_moment_has_the_corrected_pdf_term():
    value = float(truncated_moment(3, torch.tensor(0.3, dtype=F64), torch.tensor(1.2, dtype=F64)))
    assert value == pytest.approx(2.1702, abs=1e-4)
    assert abs(value - 1.5438) > 0.5  # the reference implementation's swapped coefficients


@pytest.mark.parametrize("k", range(5))
def test_zero_std_is_the_positive_part_power(k):
    m = torch.tensor([-2.0, -0.0, 0.0, 0.5, 3.0], dtype=F64)
    expected = torch.where(m > 0, m.clamp_min(0) ** k, torch.zeros_like(m))
    assert torch.equal(truncated_moment(k, m, torch.zeros_like(m)), expected)


@pytest.mark.parametrize("order", [0.1, 0.5, 4 / 3, 2.5, 5.0, 7.25])
def test_power_moment_quadrature_matches_numerical_integration(order):
    gen = torch.Generator().manual_seed(int(order * 100))
    ms = (torch.randn(5, generator=gen, dtype=F64) * 4).tolist() + [25.0, -9.0]
    ss = (torch.rand(5, generator=gen, dtype=F64) * 2 + 0.1).tolist() + [1.5, 1.0]
    got = _moment(order, torch.tensor(ms, dtype=F64), torch.tensor(ss, dtype=F64))
    for value, m, s in zip(got.tolist(), ms, ss):
        assert value == pytest.approx(_integrated_moment(order, m, s, 80001), rel=1e-9), (m, s)


def test_power_moment_matches_half_normal_and_closed_forms():
    for order in [0.3, 0.5, 2.5]:  # E[X_+^g] = 2^(g/2) Gamma((g+1)/2) / (2 sqrt(pi))
        exact = 2 ** (order / 2) * math.gamma((order + 1) / 2) / (2 * math.sqrt(math.pi))
        zero, one = torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)
        assert float(truncated_power_moment(order, zero, one)) == pytest.approx(exact, rel=1e-12)
        assert truncated_power_moment(order, 0.0, 1.0).dtype == torch.float32  # numbers: default dtype
    m, s = torch.tensor([-1.0, 0.2, 2.0], dtype=F64), torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    for k in range(5):
        assert torch.equal(truncated_power_moment(float(k), m, s), truncated_moment(k, m, s))
    zero = torch.zeros(3, dtype=F64)
    expected = torch.tensor([0.0, 0.2**0.5, 2.0**0.5], dtype=F64)
    torch.testing.assert_close(truncated_power_moment(0.5, m, zero), expected, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- gaussian_threshold


def _gaussian_residual(tau, mu, sigma, n, alpha):
    a = alpha - 1
    return n * _moment(1 / a, a * mu - tau, a * sigma) - 1


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gaussian_threshold_matches_monte_carlo(alpha):
    gen = torch.Generator().manual_seed(int(alpha * 1000))
    mu = torch.tensor([0.0, -1.3, 2.1, 0.4], dtype=F64)
    sigma = torch.tensor([1.0, 0.35, 2.7, 1.6], dtype=F64)
    n = torch.tensor([1.0, 7.0, 100.0, 4096.0], dtype=F64)
    tau = gaussian_threshold(mu, sigma, n, alpha)
    assert (_gaussian_residual(tau, mu, sigma, n, alpha).abs() < 1e-10).all()
    samples = mu[:, None] + sigma[:, None] * torch.randn(4, 10**6, generator=gen, dtype=F64)
    mass = n[:, None] * ((alpha - 1) * samples - tau[:, None]).clamp_min(0) ** (1 / (alpha - 1))
    stderr = mass.std(-1) / math.sqrt(mass.shape[-1])
    assert ((mass.mean(-1) - 1).abs() < 5 * stderr).all(), (mass.mean(-1), stderr)


@pytest.mark.parametrize("alpha", ALPHAS + [1.1, 1.75])
def test_gaussian_threshold_residual_on_wide_ranges(alpha):
    gen = torch.Generator().manual_seed(7)
    size = 64 if (1 / (alpha - 1)).is_integer() else 16
    mu = torch.randn(size, generator=gen, dtype=F64) * 5
    sigma = torch.rand(size, generator=gen, dtype=F64) ** 3 * 20
    n = torch.exp(torch.rand(size, generator=gen, dtype=F64) * math.log(2e6)).round().clamp_min(1)
    tau = gaussian_threshold(mu, sigma, n, alpha)
    assert _gaussian_residual(tau, mu, sigma, n, alpha).abs().max() < 1e-10


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gaussian_threshold_zero_sigma_is_exact(alpha):
    mu = torch.tensor([0.0, -2.0, 3.5], dtype=F64)
    n = torch.tensor([1.0, 5.0, 1000.0], dtype=F64)
    sigma = torch.tensor([0.0, 0.0, 0.0], dtype=F64)
    expected = (alpha - 1) * mu - n ** (-(alpha - 1))
    torch.testing.assert_close(gaussian_threshold(mu, sigma, n, alpha), expected, rtol=0, atol=1e-15)
    mixed = gaussian_threshold(mu, torch.tensor([0.0, 1.0, 0.0], dtype=F64), n, alpha)
    assert mixed[0] == expected[0] and mixed[2] == expected[2] and mixed[1] != expected[1]


@pytest.mark.parametrize("alpha", [1.25, 1.2, 2.0, 3.0])
def test_gaussian_threshold_tiny_sigma_approaches_the_exact_limit(alpha):
    mu = torch.tensor([1.0, -3.0, 0.0, 250.0], dtype=F64)
    n = torch.tensor([1.0, 10.0, 1e4, 3.0], dtype=F64)
    exact = (alpha - 1) * mu - n ** (-(alpha - 1))
    for scale in [1e-38, 1e-12, 1e-7]:
        sigma = torch.full_like(mu, scale)
        tau = gaussian_threshold(mu, sigma, n, alpha)
        torch.testing.assert_close(tau, exact, rtol=0, atol=1e-6)
        assert _gaussian_residual(tau, mu, sigma, n, alpha).abs().max() < 1e-9


def test_gaussian_threshold_broadcasts_and_accepts_numbers():
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 1, 5, generator=gen, dtype=F64)
    sigma = torch.rand(1, 4, 1, generator=gen, dtype=F64) + 0.1
    n = torch.arange(1, 6, dtype=torch.int64) * 10
    tau = gaussian_threshold(mu, sigma, n, 1.5)
    assert tau.shape == (3, 4, 5) and tau.dtype == F64
    one = gaussian_threshold(float(mu[2, 0, 3]), float(sigma[0, 1, 0]), 40, 1.5)
    assert float(one) == pytest.approx(float(tau[2, 1, 3]), rel=1e-6)
    assert gaussian_threshold(torch.empty(0, dtype=F64), 1.0, 5.0, 2.0).shape == (0,)


@pytest.mark.parametrize("alpha", [4 / 3, 2.0, 3.0])
def test_float32_agrees_with_float64(alpha):
    gen = torch.Generator().manual_seed(11)
    mu = torch.randn(32, generator=gen, dtype=F64) * 2
    sigma = torch.rand(32, generator=gen, dtype=F64) * 3 + 0.3
    n = torch.randint(1, 20000, (32,), generator=gen).to(F64)
    tau64 = gaussian_threshold(mu, sigma, n, alpha)
    tau32 = gaussian_threshold(mu.float(), sigma.float(), n.float(), alpha)
    assert tau32.dtype == torch.float32
    torch.testing.assert_close(tau32.double(), tau64, rtol=2e-7, atol=2e-7)
    residual = _gaussian_residual(tau32.double(), mu.float().double(), sigma.float().double(), n, alpha)
    assert residual.abs().max() < 1e-5
    half = gaussian_threshold(mu.half(), sigma.bfloat16(), n.half(), alpha)
    assert half.dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(
    mu=st.floats(-20, 20),
    sigma=st.floats(0, 10),
    n=st.floats(1, 1e6),
    alpha=st.sampled_from([1.25, 4 / 3, 1.5, 2.0]),
)
def test_gaussian_threshold_residual_property(mu, sigma, n, alpha):
    mu_t, sigma_t = torch.tensor(mu, dtype=F64), torch.tensor(sigma, dtype=F64)
    tau = gaussian_threshold(mu_t, sigma_t, n, alpha)
    a = alpha - 1
    # Conditioning: rounding tau to float64 alone moves n E by |d(nE)/dtau| ulp(tau).
    slope = n / a * _moment(1 / a - 1, a * mu_t - tau, a * sigma_t)
    tolerance = 1e-10 + 4e-16 * max(abs(float(tau)), 1.0) * float(slope)
    assert abs(float(_gaussian_residual(tau, mu_t, sigma_t, n, alpha))) < tolerance


# ----------------------------------------------------------------------------- mixture_threshold


def _mixture_residual(tau, mu, sigma, counts, alpha):
    a = alpha - 1
    used = counts > 0
    m = torch.where(used, a * mu, 0.0) - tau[..., None]
    return (counts * _moment(1 / a, m, torch.where(used, a * sigma, 0.0))).sum(-1) - 1


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mixture_with_one_component_is_gaussian(alpha):
    gen = torch.Generator().manual_seed(5)
    mu = torch.randn(6, generator=gen, dtype=F64)
    sigma = torch.rand(6, generator=gen, dtype=F64) * 2
    n = torch.randint(1, 500, (6,), generator=gen).to(F64)
    single = gaussian_threshold(mu, sigma, n, alpha)
    mixture = mixture_threshold(mu[:, None], sigma[:, None], n[:, None], alpha)
    torch.testing.assert_close(mixture, single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mixture_matches_monte_carlo_and_ignores_empty_components(alpha):
    gen = torch.Generator().manual_seed(int(alpha * 77))
    mu = torch.tensor([0.3, -1.0, 2.0, 55.0, 1.1], dtype=F64)
    sigma = torch.tensor([1.0, 0.5, 0.2, -3.0, 1.5], dtype=F64)  # component 3 is garbage
    counts = torch.tensor([16.0, 16.0, 3.0, 0.0, 9.0], dtype=F64)
    tau = mixture_threshold(mu, sigma, counts, alpha)
    assert abs(float(_mixture_residual(tau, mu, sigma, counts, alpha))) < 1e-10
    kept = counts > 0
    same = mixture_threshold(mu[kept], sigma[kept], counts[kept], alpha)
    assert float(tau) == pytest.approx(float(same), rel=1e-12, abs=1e-12)
    draws = mu[kept, None] + sigma[kept, None] * torch.randn(4, 5 * 10**5, generator=gen, dtype=F64)
    per_token = ((alpha - 1) * draws - tau).clamp_min(0) ** (1 / (alpha - 1))
    estimate = (counts[kept] * per_token.mean(-1)).sum()
    stderr = ((counts[kept] * per_token.std(-1)) ** 2 / per_token.shape[-1]).sum().sqrt()
    assert abs(float(estimate) - 1) < 5 * float(stderr)


def test_mixture_of_identical_components_pools_counts():
    tau = mixture_threshold(torch.tensor([0.5, 0.5]), torch.tensor([1.2, 1.2]), torch.tensor([3, 9]), 1.5)
    pooled = gaussian_threshold(0.5, 1.2, 12.0, 1.5)
    assert float(tau) == pytest.approx(float(pooled), abs=2e-6)


def test_mixture_reduces_over_dim_with_batches_and_zero_sigma():
    gen = torch.Generator().manual_seed(9)
    mu = torch.randn(2, 7, 3, generator=gen, dtype=F64) * 2
    sigma = torch.rand(2, 7, 3, generator=gen, dtype=F64)
    sigma[0, :, 1] = 0.0  # all-degenerate row: a piecewise polynomial equation
    counts = torch.randint(0, 17, (1, 7, 3), generator=gen).to(F64)
    counts[:, 0] = 16
    tau = mixture_threshold(mu, sigma, counts, 4 / 3, dim=1)
    assert tau.shape == (2, 3)
    moved = mixture_threshold(mu.transpose(1, 2), sigma.transpose(1, 2), counts.transpose(1, 2), 4 / 3)
    torch.testing.assert_close(tau, moved, rtol=0, atol=0)
    residual = _mixture_residual(moved, mu.transpose(1, 2), sigma.transpose(1, 2), counts.transpose(1, 2), 4 / 3)
    assert residual.abs().max() < 1e-10


def test_mixture_far_apart_alibi_like_components():
    gen = torch.Generator().manual_seed(21)
    pages = 64
    mu = torch.randn(4, pages, generator=gen, dtype=F64) - torch.linspace(40, 0, pages, dtype=F64)
    sigma = torch.rand(4, pages, generator=gen, dtype=F64) * 3
    counts = torch.full((4, pages), 16.0, dtype=F64)
    counts[:, -1] = 5
    for alpha in [1.25, 1.5, 2.0]:
        tau = mixture_threshold(mu, sigma, counts, alpha)
        assert _mixture_residual(tau, mu, sigma, counts, alpha).abs().max() < 1e-10


# ----------------------------------------------------------------------------- page_max_quantile_z


def test_page_max_quantile_z_is_the_max_quantile():
    counts = torch.tensor([1, 2, 16, 1000, 10**6])
    z = page_max_quantile_z(counts, 0.99)
    assert z.dtype == torch.float32
    z64 = page_max_quantile_z(counts.to(F64), 0.99)
    assert torch.allclose(torch.special.ndtr(z64) ** counts.to(F64), torch.full((5,), 0.99, dtype=F64), rtol=1e-12)
    assert float(z64[0]) == pytest.approx(2.3263478740408408, rel=1e-12)
    torch.testing.assert_close(z, z64.float())
    gen = torch.Generator().manual_seed(4)
    maxima = torch.randn(200000, 16, generator=gen, dtype=F64).amax(-1)
    assert float((maxima <= z64[2]).double().mean()) == pytest.approx(0.99, abs=0.0015)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: gaussian_threshold(0.0, 1.0, 10.0, 1.0), ValueError, "alpha"),
        (lambda: gaussian_threshold(0.0, 1.0, 10.0, 0.5), ValueError, "alpha"),
        (lambda: gaussian_threshold(0.0, 1.0, 10.0, True), TypeError, "alpha"),
        (lambda: gaussian_threshold(0.0, 1.0, 10.0, "1.5"), TypeError, "alpha"),
        (lambda: gaussian_threshold(0.0, -1.0, 10.0, 1.5), ValueError, "sigma"),
        (lambda: gaussian_threshold(0.0, 1.0, 0.5, 1.5), ValueError, "n"),
        (lambda: gaussian_threshold(float("nan"), 1.0, 5.0, 1.5), ValueError, "mu"),
        (lambda: gaussian_threshold(torch.tensor([1, 2]), 1.0, 5.0, 1.5), TypeError, "mu"),
        (lambda: gaussian_threshold(torch.tensor([True]), 1.0, 5.0, 1.5), TypeError, "mu"),
        (lambda: gaussian_threshold(0.0, "1", 5.0, 1.5), TypeError, "sigma"),
        (lambda: gaussian_threshold(0.0, 1.0, 5.0, 1.5, iterations=0), ValueError, "iterations"),
        (lambda: gaussian_threshold(torch.zeros(2, device="meta"), torch.ones(2), 5.0, 1.5), ValueError, "device"),
        (lambda: mixture_threshold(torch.zeros(3), torch.ones(3), torch.tensor([1.0, -1.0, 2.0]), 1.5), ValueError, "counts"),
        (lambda: mixture_threshold(torch.zeros(2, 3), torch.ones(3), torch.tensor([[1.0, 0, 0], [0, 0, 0]]), 1.5), ValueError, "counts"),
        (lambda: mixture_threshold(torch.zeros(3), torch.tensor([1.0, -1.0, 1.0]), torch.ones(3), 1.5), ValueError, "sigma"),
        (lambda: mixture_threshold(torch.zeros(3), torch.ones(3), torch.ones(3), 1.5, dim=1), ValueError, "dim"),
        (lambda: mixture_threshold(torch.zeros(3), torch.ones(3), torch.ones(3), 1.5, dim=0.5), TypeError, "dim"),
        (lambda: mixture_threshold(0.0, 1.0, 1.0, 1.5), ValueError, "dimension"),
        (lambda: mixture_threshold(torch.zeros(3), torch.ones(3), torch.ones(3), 1.0), ValueError, "alpha"),
        (lambda: truncated_moment(5, 0.0, 1.0), ValueError, "k"),
        (lambda: truncated_moment(2.0, 0.0, 1.0), TypeError, "k"),
        (lambda: truncated_moment(2, 0.0, -1.0), ValueError, "std"),
        (lambda: truncated_power_moment(-0.5, 0.0, 1.0), ValueError, "beta"),
        (lambda: truncated_power_moment(None, 0.0, 1.0), TypeError, "beta"),
        (lambda: page_max_quantile_z(torch.tensor([0.0, 3.0]), 0.9), ValueError, "counts"),
        (lambda: page_max_quantile_z(torch.tensor([2.0]), 1.0), ValueError, "quantile"),
        (lambda: page_max_quantile_z(torch.tensor([2.0]), "0.9"), TypeError, "quantile"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_value_checks_can_be_skipped():
    tau = gaussian_threshold(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.5]), 1.5, check_values=False)
    assert tau.shape == (1,)  # no error: the caller vouched for the values (hot path, no sync)
