"""The decode kernels in parts (context parallel decode, ``runtime/attend/partial.py``): the
gather of the scores above a floor and the exact threshold of every rank's gathered scores,
against float64 references. On CPU under the Triton interpreter at small sizes; with
``ENTMAXKV_KERNEL_TEST_DEVICE=cuda`` at real sizes on a GPU."""

import math

import pytest
import torch

from conftest import KERNEL_REAL_SHAPES, on_kernel_device
from entmaxkv_compile.math.reference import entmax_threshold
from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.attend.partial import FLOOR_MARGIN

pytestmark = pytest.mark.kernels
ALPHAS = [1.25, 4 / 3, 1.5, 1.75, 2.0]
FAMILIES = ["spread", "narrow", "ties", "single", "outlier"]


def _scores(family: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """z-unit scores [n] (float32 values held in float64) of one family."""
    if n == 0:  # a rank holding none of the sequence
        return torch.empty(0, dtype=torch.float64)
    if family == "spread":
        z = torch.randn(n, generator=gen, dtype=torch.float64) * 2.0
    elif family == "narrow":  # many scores within the threshold's reach
        z = torch.rand(n, generator=gen, dtype=torch.float64) * 0.05
    elif family == "ties":
        z = torch.full((n,), 0.7, dtype=torch.float64)
    elif family == "single":
        z = torch.randn(n, generator=gen, dtype=torch.float64) - 30.0
        z[n // 2] = 5.0
    else:  # one huge outlier over a crowd
        z = torch.rand(n, generator=gen, dtype=torch.float64)
        z[0] = 1e4
    return z.float().double()


def _gathered(parts: list[torch.Tensor], alpha: float, cap: int, garbage: float):
    """What the ranks would gather: ``tau_lo`` (the max of the parts' thresholds, float32) and
    ``[W, 1, 1, cap + 1]`` holding each part's scores above the floor, their count last; the
    slots past the count hold ``garbage`` (the kernel must not read them)."""
    locals_ = [entmax_threshold(p / (alpha - 1.0), alpha).float() for p in parts if p.numel()]
    tau_lo = torch.stack(locals_).max() if locals_ else torch.tensor(float("-inf"))
    floor = tau_lo - FLOOR_MARGIN * (1.0 + tau_lo.abs())
    out = torch.full((len(parts), 1, 1, cap + 1), garbage, dtype=torch.float32)
    for w, p in enumerate(parts):
        above = p[p.float() > floor].float()
        out[w, 0, 0, :min(cap, above.numel())] = above[:cap]
        out[w, 0, 0, cap] = above.numel()
    return out, tau_lo.view(1, 1)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gathered_threshold_is_the_threshold_of_every_rank_together(alpha, family):
    gen = torch.Generator().manual_seed(FAMILIES.index(family) * 10 + ALPHAS.index(alpha))
    sizes = (700, 0, 1300, 257) if KERNEL_REAL_SHAPES else (37, 0, 61, 5)
    parts = [_scores(family, n, gen) for n in sizes]
    everything = torch.cat(parts)
    want = entmax_threshold(everything / (alpha - 1.0), alpha)
    gathered, tau_lo = _gathered(parts, alpha, cap=2048 if KERNEL_REAL_SHAPES else 64, garbage=1e6)
    tau, exact = on_kernel_device(kernels.solve_gathered, gathered, tau_lo, alpha)
    assert exact.view(torch.int8).eq(1).all()
    scale = max(1.0, float(everything.abs().max()))
    torch.testing.assert_close(tau.double().view(()), want, atol=2e-6 * scale, rtol=0)


def test_gathered_threshold_flags_overflow_poison_and_nothing():
    alpha, cap = 1.5, 4
    gen = torch.Generator().manual_seed(5)
    parts = [_scores("narrow", 40, gen), _scores("narrow", 9, gen)]
    crowded, tau_lo = _gathered(parts, alpha, cap=cap, garbage=0.0)
    assert crowded[0, 0, 0, cap] > cap  # this rank had more than the gather's room
    empty = torch.zeros(2, 1, 1, cap + 1)
    gathered = torch.cat([crowded, empty, empty], 2)  # heads: crowded, poisoned, nothing attended
    tau_lo = torch.tensor([[float(tau_lo), float("inf"), float("-inf")]])
    tau, exact = on_kernel_device(kernels.solve_gathered, gathered, tau_lo, alpha)
    assert exact.view(torch.int8).tolist() == [[0, 0, 1]]  # bools as stored: 0 or 1, nothing else
    assert (~exact).tolist() == [[True, True, False]]
    assert torch.isnan(tau[0, 1]) and tau[0, 2] == float("inf")


@pytest.mark.parametrize("alpha", [1.5, 1.25])
def test_gather_above_keeps_exactly_the_candidates_above_the_floor(alpha):
    """A planted span on a few pages: most splits lie wholly below the floor and are skipped;
    what is gathered is every candidate above it, and its count."""
    gen = torch.Generator().manual_seed(11)
    cap = 4096 if KERNEL_REAL_SHAPES else 256  # room for every score: the count must be exact
    batch, hq, hkv, dim, page = 2, 4, 2, 24, 4
    n = 4096 if KERNEL_REAL_SHAPES else 96
    q = torch.randn(batch, hq, 1, dim, generator=gen)
    k = torch.randn(batch, hkv, n, dim, generator=gen) * 0.3
    k[:, :, n // 3:n // 3 + 5] = 2.0 * q.view(batch, hkv, hq // hkv, dim)[:, :, :1]  # a relevant span
    lengths = torch.tensor([n, n - 7])
    pages = (n + page - 1) // page
    indices = torch.arange(pages, dtype=torch.int32).expand(batch, hkv, pages).contiguous()
    counts = torch.full((batch, hkv), pages, dtype=torch.int32)

    def run(q, k, lengths, indices, counts):
        local = kernels.local_candidates(q, k, lengths, indices, counts, page_size=page, alpha=alpha,
                                         scale=1 / math.sqrt(dim))
        tau_lo = local.tau - 0.1 * (alpha - 1.0)  # a floor under the local threshold, as a rank's would be
        return local, tau_lo, kernels.gather_above(local, tau_lo, cap)

    local, tau_lo, got = on_kernel_device(run, q, k, lengths, indices, counts)
    floor = tau_lo - FLOOR_MARGIN * (1.0 + tau_lo.abs())
    splits = local.cand_cnt.shape[2]
    seg = local.cand_z.shape[2] // splits
    for b in range(batch):
        for h in range(hq):
            kept = [local.cand_z[b, h, s * seg:s * seg + int(local.cand_cnt[b, h // (hq // hkv), s])]
                    for s in range(splits)]
            kept = torch.cat(kept)
            want = kept[kept > floor[b, h]].sort().values
            count = int(got[b, h, -1])
            assert count == want.numel() and 0 < count <= cap
            torch.testing.assert_close(got[b, h, :count].sort().values, want, atol=0, rtol=0)
