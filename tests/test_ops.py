"""The entmaxkv ops: torch.library.opcheck (schema, fake, dispatch) and agreement with the reference."""

import pytest
import torch

import entmaxkv_compile.runtime.ops  # noqa: F401  (registers the ops)
from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.runtime.decode import sparse_decode
from entmaxkv_compile.math.reference import entmax

OPS = torch.ops.entmaxkv
B, HQ, HKV, N, D, P = 2, 6, 2, 45, 8, 8


def _inputs(dtype=torch.float32, alibi=False):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, HQ, 1, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, N, D, generator=g, dtype=dtype)
    seqlens = torch.tensor([N, 19])
    slopes = torch.linspace(0.05, 0.5, HQ, dtype=torch.float32) if alibi else None
    return q, k, v, seqlens, slopes


def test_entmax_op_opcheck_and_values():
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.entmax, (x, 1.5, -1))
    torch.library.opcheck(OPS.entmax, (torch.randn(2, 5, 4), 1.25, 1))
    torch.testing.assert_close(OPS.entmax(x, 2.0, -1), entmax(x, 2.0))
    (g,) = torch.autograd.grad(OPS.entmax(x, 1.5, -1).pow(2).sum(), x)
    (g_ref,) = torch.autograd.grad(entmax(x, 1.5).pow(2).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_stats_ops_opcheck_and_match_reference():
    q, k, *_ = _inputs()
    seqlens = torch.tensor([N, 19])
    ref = KVPageStats.from_cache(k, seqlens, P)
    bufs = KVPageStats.allocate(B, HKV, N, D, page_size=P, dtype=k.dtype).buffers()
    torch.library.opcheck(OPS.page_stats_prefill, (k, seqlens, P, *bufs))
    OPS.page_stats_prefill(k, seqlens, P, *bufs)
    for got, want in zip(bufs, ref.buffers()):
        torch.testing.assert_close(got, want)
    positions = seqlens - 1
    torch.library.opcheck(OPS.page_stats_append, (k, positions, P, *[b.clone() for b in bufs]))


@pytest.mark.parametrize("selector", ["gaussian", "topk", "certified", "dense"])
@pytest.mark.parametrize("alibi", [False, True])
def test_step_ops_opcheck(selector, alibi):
    q, k, v, seqlens, slopes = _inputs(alibi=alibi)
    stats = KVPageStats.from_cache(k, seqlens, P).buffers()
    params = (0.3, 1.5, P, selector, 16, 0.99, 0.0, "auto", 0, 0, 2, 0)
    torch.library.opcheck(OPS.decode_step, (q, k, v, seqlens, *stats, slopes, *params))
    valid, dense_rows = torch.ones(B, dtype=torch.bool), torch.tensor([True] + [False] * (B - 1))
    torch.library.opcheck(OPS.decode_step, (q, k, v, seqlens, *stats, slopes, *params, valid, dense_rows))
    sel_params = (0.3, 1.5, P, "topk" if selector == "certified" else selector, 16, 0.99, 0.0, "auto", 0, 0, 0)
    idx, cnt = OPS.select_pages(q, *stats, seqlens, slopes, *sel_params)
    torch.library.opcheck(OPS.select_pages, (q, *stats, seqlens, slopes, *sel_params))
    torch.library.opcheck(OPS.paged_decode, (q, k, v, seqlens, idx, cnt, slopes, 0.3, 1.5, P))
    out, tau = OPS.paged_decode(q, k, v, seqlens, idx, cnt, slopes, 0.3, 1.5, P)
    torch.library.opcheck(OPS.certify, (q, stats[0], stats[1], seqlens, idx, cnt, tau, slopes, 0.3, 1.5, P))


def test_certify_policy_update_opcheck_and_effect():
    skip = torch.tensor([0, 2], dtype=torch.int32)
    args = (skip.clone(), skip > 0, torch.tensor([[6, 6], [1, 1]], dtype=torch.int32), torch.tensor([64, 64]),
            P, 8, 0.5, 4)
    torch.library.opcheck(OPS.certify_policy_update, args)
    OPS.certify_policy_update(skip, *args[1:])
    assert skip.tolist() == [3, 1]


@pytest.mark.parametrize("selector", ["gaussian", "topk", "certified"])
def test_decode_step_matches_sparse_decode(selector):
    q, k, v, seqlens, slopes = _inputs(dtype=torch.float64, alibi=True)
    stats = KVPageStats.from_cache(k, seqlens, P)
    cfg = EntmaxKVConfig(selector=selector, page_size=P, token_budget=16, certify_max_rounds=2)
    got = OPS.decode_step(q, k, v, seqlens, *stats.buffers(), slopes, 0.3, 1.5, P, selector, 16,
                          0.99, 0.0, "auto", 0, 0, 2, 0)
    want = sparse_decode(q, k, v, seqlens, cfg, stats, alibi_slopes=slopes, scale=0.3)
    for a, b in zip(got, want[:5]):
        torch.testing.assert_close(a, b)


def test_export_reference_of_certify_matches_the_op():
    """The pure-torch stand-in that exports substitute for ``entmaxkv::certify`` (it once called
    itself instead of the certify stage)."""
    from entmaxkv_compile.export.references import reference_implementations

    certify_reference = reference_implementations()[torch.ops.entmaxkv.certify.default]

    q, k, v, seqlens, slopes = _inputs(alibi=True)
    stats = KVPageStats.from_cache(k, seqlens, P).buffers()
    sel_params = (0.3, 1.5, P, "topk", 16, 0.99, 0.0, "auto", 0, 0, 0)
    idx, cnt = OPS.select_pages(q, *stats, seqlens, slopes, *sel_params)
    tau = torch.randn(B, HQ)
    want = OPS.certify(q, stats[0], stats[1], seqlens, idx, cnt, tau, slopes, 0.3, 1.5, P)
    got = certify_reference(q, stats[0], stats[1], seqlens, idx, cnt, tau, slopes, 0.3, 1.5, P)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
