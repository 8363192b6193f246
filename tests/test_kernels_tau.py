"""The split-parallel exact threshold of the decode kernels against the float64 sort-based one.

Scores are planted exactly (q along one axis, that axis of K holding the score), so each row
family is the hard case it names: ties, every token a candidate, a single candidate, one huge
outlier, a large shared offset, clusters of duplicates. On CPU under the Triton interpreter at
small sizes; with ``ENTMAXKV_KERNEL_TEST_DEVICE=cuda`` at real sizes on a GPU.
"""

import math
import os

DEVICE = os.environ.get("ENTMAXKV_KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from entmaxkv_compile import metrics  # noqa: E402
from entmaxkv_compile.math import reference  # noqa: E402
from entmaxkv_compile.runtime import kernels  # noqa: E402
from entmaxkv_compile.runtime.attend.tau_kernels import FLOOR_STEPS, _floor_of_subset  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.available(DEVICE),
                                reason=f"Triton kernels cannot run on {DEVICE}")
REAL = DEVICE != "cpu"
ALPHAS = [1.25, 4 / 3, 1.5, 1.75, 2.0]


def _family(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Raw scores [n] of one hard family (float64)."""
    if name == "ties":
        return torch.full((n,), 0.3, dtype=torch.float64)
    if name == "flat":  # every token within 1e-2 of the max: all are candidates
        return torch.rand(n, generator=gen, dtype=torch.float64) * 1e-2
    if name == "single":
        s = torch.zeros(n, dtype=torch.float64)
        s[n // 3] = 50.0
        return s
    if name == "outlier":
        s = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
        s[n - 2] = 1e3
        return s
    if name == "offset":
        return 1e3 + torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
    if name == "clusters":  # a few values, each repeated many times
        return torch.randint(0, 4, (n,), generator=gen).to(torch.float64) * 0.37
    return torch.randn(n, generator=gen, dtype=torch.float64) * 3.0  # "iid"


def _planted(scores: torch.Tensor, dim: int, dtype: torch.dtype):
    """q [1, 2, 1, D], K [1, 1, N, D] with scale 1/sqrt(D): head 0 sees +scores, head 1 -scores/2."""
    n = scores.shape[-1]
    q = torch.zeros(1, 2, 1, dim, dtype=torch.float64)
    q[0, 0, 0, 0] = math.sqrt(dim)
    q[0, 1, 0, 0] = -0.5 * math.sqrt(dim)
    k = torch.zeros(1, 1, n, dim, dtype=torch.float64)
    k[0, 0, :, 0] = scores
    v = torch.randn(1, 1, n, dim, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _full_selection(seqlens: torch.Tensor, kv_heads: int, num_pages: int, page: int):
    valid = -(-seqlens.cpu() // page)
    idx = torch.arange(num_pages, dtype=torch.int32).repeat(seqlens.shape[0], kv_heads, 1)
    idx = torch.where(idx < valid[:, None, None], idx, -1)
    nsel = valid.to(torch.int32)[:, None].repeat(1, kv_heads)
    return idx.to(DEVICE), nsel.to(DEVICE)


FAMILIES = ["ties", "flat", "single", "outlier", "offset", "clusters", "iid"]
CASES = [(f, 1.5) for f in FAMILIES] + [(f, a) for f in ("flat", "clusters", "iid", "single")
                                        for a in ALPHAS if a != 1.5]


@pytest.mark.parametrize("family, alpha", CASES)
def test_tau_equals_sorted_reference(family, alpha):
    n, dim, page = (50_000, 128, 16) if REAL else (203, 16, 8)
    gen = torch.Generator().manual_seed(hash((family, alpha)) % 2**31)
    scores = _family(family, n, gen)
    q, k, v = _planted(scores, dim, torch.float32)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    seqlens = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    idx, nsel = _full_selection(seqlens, 1, -(-n // page), page)
    out, tau = kernels.paged_decode(q, k, v, seqlens, idx, nsel, page_size=page, alpha=alpha,
                                    scale=1 / math.sqrt(dim))
    z = (alpha - 1.0) * torch.stack([scores, -0.5 * scores])  # exact float64 scores per head
    ref_tau = reference.entmax_threshold(z / (alpha - 1.0), alpha, dim=-1)
    scale_z = 1.0 + z.abs().max(-1).values
    err = (tau.double().cpu() - ref_tau).abs() / scale_z
    assert torch.isfinite(tau).all()
    assert err.max() < 2e-6, (family, alpha, tau, ref_tau)
    full, _ = metrics.full_entmax_decode(q.double(), k.double(), v.double(), seqlens, alpha,
                                         1 / math.sqrt(dim))
    # A shared offset of 1e3 leaves float32 scores only ~1e-4 of absolute resolution.
    tol = 2e-3 if family == "offset" else 1e-4
    assert float(metrics.relative_error(out.double().cpu(), full.cpu())) < tol


@pytest.mark.parametrize("dtype, alpha", [(torch.float16, 4 / 3), (torch.bfloat16, 1.5),
                                          (torch.float32, 2.0), (torch.float16, 1.75)])
def test_tau_ragged_alibi_gqa(dtype, alpha):
    """Random keys, ALiBi, GQA 4 and a ragged batch: tau against the float64 threshold of the
    same (rounded) inputs."""
    batch, hq, hkv, nmax, dim, page = (3, 32, 8, 20_000, 128, 16) if REAL else (3, 8, 2, 70, 24, 8)
    gen = torch.Generator().manual_seed(int(alpha * 100) + dtype.itemsize)
    q = torch.randn(batch, hq, 1, dim, generator=gen).to(dtype)
    k = (torch.randn(batch, hkv, nmax, dim, generator=gen) * 0.3).to(dtype)
    v = torch.randn(batch, hkv, nmax, dim, generator=gen).to(dtype)
    seqlens = torch.tensor([nmax, 1, nmax // 2 + 3], dtype=torch.int32)
    slopes = torch.rand(hq, generator=gen) * 0.05
    idx, nsel = _full_selection(seqlens, hkv, -(-nmax // page), page)
    dev = dict(device=DEVICE)
    out, tau = kernels.paged_decode(q.to(**dev), k.to(**dev), v.to(**dev), seqlens.to(**dev), idx, nsel,
                                    page_size=page, alpha=alpha, scale=1 / math.sqrt(dim),
                                    alibi_slopes=slopes.to(**dev))
    full, _ = metrics.full_entmax_decode(q.double(), k.double(), v.double(), seqlens, alpha,
                                         1 / math.sqrt(dim), alibi_slopes=slopes.double())
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), kk) / math.sqrt(dim)
    rel = torch.arange(nmax)[None, :] - (seqlens.long()[:, None] - 1)
    scores = scores + slopes.double()[None, :, None] * rel[:, None, :].double()
    valid = (rel <= 0)[:, None, :].expand_as(scores)
    ref_tau = reference.entmax_threshold(torch.where(valid, scores, float("-inf")), alpha, mask=valid)
    assert torch.allclose(tau.double().cpu(), ref_tau, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert float(metrics.relative_error(out.double().cpu(), full)) < tol


@triton.jit
def _floor_kernel(z_ptr, out_ptr, n, beta, RMAX: tl.constexpr, BLOCK: tl.constexpr,
                  STEPS: tl.constexpr):
    """One row of scores per program: the level-1 floor of tau_first_kernel."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    z = tl.load(z_ptr + row * BLOCK + offs, mask=offs < n, other=float("-inf"))
    tl.store(out_ptr + row, _floor_of_subset(z, tl.max(z, axis=0), beta, RMAX, STEPS))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_floor_of_a_subset_is_a_tight_lower_bound_of_its_threshold(alpha):
    """The level-1 lower bound (Newton from ``M - 1`` on a few scores, here the splits' maxima)
    never exceeds the threshold of those scores (so never the full one), never falls below
    ``M - 1``, and is close to it: this is what keeps flat heads' survivors few."""
    gen = torch.Generator().manual_seed(int(alpha * 1000))
    rows, block = 32, 64
    z = torch.randn(rows, block, generator=gen, dtype=torch.float64) * torch.logspace(-3, 1, rows, dtype=torch.float64)[:, None]
    z[0] = 0.25  # ties
    z[1, 1:] = -1e3  # a single score
    z[2, 5:] = float("-inf")
    z[3] = float("-inf")  # no score: no bound
    beta = 1.0 / (alpha - 1.0)
    rmax = int(beta) if beta in (1.0, 2.0) else 0
    out = torch.empty(rows, dtype=torch.float32, device=DEVICE)
    z32 = z.to(torch.float32)
    _floor_kernel[(rows,)](z32.to(DEVICE), out, block, beta, RMAX=rmax, BLOCK=block, STEPS=FLOOR_STEPS)
    floor = out.double().cpu()
    assert floor[3] == float("-inf")
    floor, z32 = torch.cat([floor[:3], floor[4:]]), torch.cat([z32[:3], z32[4:]])
    zz = z32.double()
    tau = reference.entmax_threshold(zz / (alpha - 1.0), alpha, dim=-1, mask=torch.isfinite(zz))
    big_m = zz.max(-1).values
    ulp = 2.0 ** -23 * (big_m.abs() + 1.0)  # M - 1 itself is rounded to float32
    assert bool((floor <= tau + ulp).all()), (floor - tau)
    assert bool((floor >= big_m - 1.0 - 1e-6).all())
    assert bool((tau - floor <= 0.05 * (big_m - tau) + 1e-4).all()), (tau - floor) / (big_m - tau)
