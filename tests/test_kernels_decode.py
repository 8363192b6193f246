"""The fused sparse entmax decode kernel against the reference ``runtime.attend.reference.paged_decode``.

On CPU the kernels run under the Triton interpreter at tiny shapes; with
``ENTMAXKV_KERNEL_TEST_DEVICE=cuda`` (benchmarks/gpu_check.py) the same tests run compiled on a
GPU at real shapes.
"""

import math

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE
from conftest import KERNEL_REAL_SHAPES as REAL

from entmaxkv_compile import metrics
from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.attend import reference as attend_reference

pytestmark = pytest.mark.kernels


def _random_selection(gen, seqlens, kv_heads, num_pages, page_size, keep):
    """Random ascending page lists per (b, kv head), always holding the last valid page."""
    batch = seqlens.shape[0]
    idx = torch.full((batch, kv_heads, num_pages), -1, dtype=torch.int32)
    nsel = torch.zeros((batch, kv_heads), dtype=torch.int32)
    for b in range(batch):
        valid = -(-int(seqlens[b]) // page_size)
        for h in range(kv_heads):
            pick = torch.rand(valid, generator=gen) < keep
            pick[valid - 1] = True
            pages = torch.nonzero(pick).flatten().to(torch.int32)
            idx[b, h, : pages.numel()] = pages
            nsel[b, h] = pages.numel()
    return idx.to(DEVICE), nsel.to(DEVICE)


def _case(seed, batch, hq, hkv, nmax, dim, dtype, *, structured=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, dim, generator=gen)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen)
    v = torch.randn(batch, hkv, nmax, dim, generator=gen)
    if structured:  # planted clusters aligned with the query: a small support
        for b in range(batch):
            rows = torch.randint(0, nmax, (max(2, nmax // 50),), generator=gen)
            k[b, :, rows] += 3.0 * q[b, :: hq // hkv, 0][:, None, :]
    seqlens = torch.randint(1, nmax + 1, (batch,), generator=gen, dtype=torch.int32)
    seqlens[0] = nmax
    to = dict(device=DEVICE, dtype=dtype)
    return gen, q.to(**to), k.to(**to), v.to(**to), seqlens.to(DEVICE)


SHAPES_CPU = [
    # batch, hq, hkv, nmax, dim, page_size, dtype, alpha, alibi
    (2, 4, 4, 53, 16, 8, torch.float32, 1.5, False),    # MHA, partial last page
    (2, 8, 2, 77, 24, 16, torch.float16, 2.0, True),    # GQA 4, odd head dim, ALiBi
    (1, 8, 1, 45, 32, 8, torch.bfloat16, 4 / 3, False),  # GQA 8
    (3, 4, 1, 40, 16, 4, torch.float32, 1.25, True),    # ragged batch of 3, general alpha
    (1, 4, 2, 90, 16, 32, torch.float16, 1.5, False),   # pages longer than the K tile
]
SHAPES_GPU = [
    (2, 32, 8, 8191, 128, 16, torch.float16, 1.5, False),
    (2, 32, 8, 4099, 128, 16, torch.bfloat16, 2.0, True),
    (1, 8, 8, 16384, 128, 16, torch.float16, 4 / 3, False),
    (3, 16, 2, 3001, 64, 32, torch.float32, 1.25, True),
]


@pytest.mark.parametrize("shape", SHAPES_GPU if REAL else SHAPES_CPU)
@pytest.mark.parametrize("structured", [False, True])
def test_paged_decode_matches_reference(shape, structured):
    batch, hq, hkv, nmax, dim, page, dtype, alpha, alibi = shape
    gen, q, k, v, seqlens = _case(len(str(shape)) + structured, batch, hq, hkv, nmax, dim, dtype,
                                  structured=structured)
    idx, nsel = _random_selection(gen, seqlens.cpu(), hkv, -(-nmax // page), page, keep=0.6)
    slopes = (torch.rand(hq, generator=gen) * 0.1).to(DEVICE) if alibi else None
    kw = dict(page_size=page, alpha=alpha, scale=1 / math.sqrt(dim), alibi_slopes=slopes)
    out, tau = kernels.paged_decode(q, k, v, seqlens, idx, nsel, **kw)
    ref_out, ref_tau = attend_reference.paged_decode(q, k, v, seqlens, idx, nsel, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and tau.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert float(metrics.relative_error(out.float(), ref_out.float())) < tol
    assert torch.allclose(tau, ref_tau, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_dense_decode_equals_full_entmax(alpha):
    batch, hq, hkv, nmax, dim, page = (2, 8, 2, 8192, 128, 16) if REAL else (2, 4, 2, 37, 16, 8)
    gen, q, k, v, seqlens = _case(7, batch, hq, hkv, nmax, dim, torch.float32)
    pages = -(-nmax // page)
    valid = -(-seqlens.cpu() // page)
    idx = torch.arange(pages, dtype=torch.int32).repeat(batch, hkv, 1)
    idx = torch.where(idx < valid[:, None, None], idx, -1).to(DEVICE)
    nsel = valid.to(torch.int32)[:, None].repeat(1, hkv).to(DEVICE)
    out, _ = kernels.paged_decode(q, k, v, seqlens, idx, nsel, page_size=page, alpha=alpha,
                                  scale=1 / math.sqrt(dim))
    full, _ = metrics.full_entmax_decode(q.double(), k.double(), v.double(), seqlens, alpha,
                                         1 / math.sqrt(dim))
    assert float(metrics.relative_error(out.double(), full)) < 1e-5


def test_decode_is_deterministic_and_writes_every_output():
    batch, hq, hkv, nmax, dim, page = (1, 32, 8, 4096, 128, 16) if REAL else (1, 8, 2, 64, 16, 16)
    gen, q, k, v, seqlens = _case(11, batch, hq, hkv, nmax, dim, torch.float16, structured=True)
    idx, nsel = _random_selection(gen, seqlens.cpu(), hkv, -(-nmax // page), page, keep=0.5)
    kw = dict(page_size=page, alpha=1.5, scale=1 / math.sqrt(dim))
    first = kernels.paged_decode(q, k, v, seqlens, idx, nsel, **kw)
    second = kernels.paged_decode(q, k, v, seqlens, idx, nsel, **kw)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.isfinite(first[0]).all() and torch.isfinite(first[1]).all()


@pytest.mark.parametrize("read_all", [True, False])
def test_verdict_written_by_the_decode_matches_the_reference(read_all):
    """The reduce kernel's ``(certified, delta)``: with every page read, certified exactly where
    tau is finite (not a poisoned head, NaN; not a head with nothing to attend, +inf), else never."""
    batch, hq, hkv, nmax, dim, page = (2, 32, 8, 4096, 128, 16) if REAL else (2, 4, 2, 40, 16, 8)
    gen, q, k, v, seqlens = _case(5, batch, hq, hkv, nmax, dim, torch.float32)
    idx, nsel = _random_selection(gen, seqlens.cpu(), hkv, -(-nmax // page), page, keep=1.0)
    k[0, 0, 0, 0] = float("nan")  # poisons every head of KV head 0 in row 0
    nsel[1, 1] = 0  # KV head 1 of row 1 attends nothing
    out, tau, certified, delta = kernels.paged_decode_verdict(
        q, k, v, seqlens, idx, nsel, page_size=page, alpha=1.5, scale=1 / math.sqrt(dim), read_all=read_all)
    ref_certified, ref_delta = attend_reference.decode_verdict(tau, read_all)
    assert certified.dtype == torch.bool and delta.dtype == torch.float32
    assert torch.equal(certified, ref_certified) and torch.equal(delta, ref_delta)
    group = hq // hkv
    assert tau[0, :group].isnan().all() and (tau[1, group:2 * group] == float("inf")).all()
    assert int(certified.sum()) == (batch * hq - 2 * group if read_all else 0)
    plain = kernels.paged_decode(q, k, v, seqlens, idx, nsel, page_size=page, alpha=1.5, scale=1 / math.sqrt(dim))
    for a, b in zip(plain, (out, tau)):  # the same decode, bit for bit (NaN where poisoned)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_registered_op_is_the_launcher():
    assert hasattr(torch.ops.entmaxkv, "triton_paged_decode")
    gen, q, k, v, seqlens = _case(3, 1, 2, 1, 20, 16, torch.float32)
    idx, nsel = _random_selection(gen, seqlens.cpu(), 1, 3, 8, keep=1.0)
    a = torch.ops.entmaxkv.triton_paged_decode(q, k, v, seqlens, idx, nsel, None, 8, 1.5, 0.25)
    b = kernels.paged_decode(q, k, v, seqlens, idx, nsel, page_size=8, alpha=1.5, scale=0.25)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("change, error", [
    ("q_dtype", TypeError), ("idx_dtype", ValueError), ("alpha", ValueError),
    ("page_size", ValueError), ("slopes", ValueError), ("q_shape", ValueError),
])
def test_bad_inputs_raise(change, error):
    gen, q, k, v, seqlens = _case(5, 1, 4, 2, 16, 16, torch.float32)
    idx, nsel = _random_selection(gen, seqlens.cpu(), 2, 2, 8, keep=1.0)
    kw = dict(page_size=8, alpha=1.5, scale=0.25, alibi_slopes=None)
    if change == "q_dtype":
        q = q.half()
    elif change == "idx_dtype":
        idx = idx.long()
    elif change == "alpha":
        kw["alpha"] = 1.0
    elif change == "page_size":
        kw["page_size"] = 6
    elif change == "slopes":
        kw["alibi_slopes"] = torch.ones(3, device=DEVICE)
    else:
        q = q[:, :3]
    with pytest.raises(error):
        kernels.paged_decode(q, k, v, seqlens, idx, nsel, **kw)


def test_results_do_not_depend_on_the_candidates_the_k_pass_keeps():
    """Sharing maxima across splits changes which extra candidates each split keeps (here: the
    interpreter runs splits in order, so later ones filter against earlier maxima), and the grid
    shape changes the splits themselves; the tau levels and the output compact the tokens that
    matter first, so the results are bit for bit equal across sharing periods, and equal to
    rounding across grids (the split count groups the partial sums differently)."""
    from entmaxkv_compile.runtime.tuning import tuned

    batch, hq, hkv, nmax, dim, page = (1, 32, 8, 8192, 128, 16) if REAL else (2, 8, 2, 96, 16, 16)
    gen, q, k, v, seqlens = _case(5, batch, hq, hkv, nmax, dim, torch.float16, structured=False)
    idx, nsel = _random_selection(gen, seqlens.cpu(), hkv, -(-nmax // page), page, keep=1.0)
    kw = dict(page_size=page, alpha=1.5, scale=1 / math.sqrt(dim))
    results = []
    for share_every in (0, 1, 3):
        cfg = tuned.decode_config(q.device, q.dtype, dim, hq // hkv, page)
        with tuned.override("paged_decode", {**cfg, "SHARE_EVERY": share_every}):
            results.append(kernels.paged_decode(q, k, v, seqlens, idx, nsel, **kw))
    for out, tau in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(tau, results[0][1])
    # Other grid shapes group the partial sums differently: equal to rounding.
    for programs_per_sm in (1, 3):
        with tuned.override("paged_decode", {**cfg, "PROGRAMS_PER_SM": programs_per_sm}):
            out, tau = kernels.paged_decode(q, k, v, seqlens, idx, nsel, **kw)
        torch.testing.assert_close(out, results[0][0], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(tau, results[0][1], rtol=1e-5, atol=1e-5)
