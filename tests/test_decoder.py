"""The plan/run decoder: it validates once, then runs the same step as ``sparse_decode``.

On CPU the decoder runs the stage references; the CUDA-graph test (GPU only) captures
``append`` + ``run`` once and replays it for 1000 decode steps against the eager decoder.
"""

import math

import pytest
import torch

from entmaxkv_compile import EntmaxKVConfig, KVPageStats, sparse_decode
from entmaxkv_compile.runtime.decoder import Decoder


def _cache(seed, batch=2, hq=4, hkv=2, nmax=64, dim=16, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, dim, generator=gen)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen)
    v = torch.randn(batch, hkv, nmax, dim, generator=gen)
    k[:, :, 5] += 2.0 * q[:, ::hq // hkv, 0]  # one clearly relevant token per KV head
    to = dict(dtype=dtype, device=device)
    return q.to(**to), k.to(**to), v.to(**to)


@pytest.mark.parametrize("selector", ["gaussian", "topk", "certified", "dense"])
def test_run_equals_sparse_decode(selector):
    q, k, v = _cache(1)
    seqlens = torch.tensor([64, 37], dtype=torch.int32)
    config = EntmaxKVConfig(selector=selector, page_size=8, token_budget=16, report_bound=True)
    decoder = Decoder.for_cache(k, q.shape[1], config)
    decoder.prefill(k, seqlens)
    got = decoder.run(q, k, v, seqlens)
    want = sparse_decode(q, k, v, seqlens, config)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_decode_loop_with_appends_is_certified_full_entmax():
    """Write a token, append it to the statistics, decode: every step equals full entmax."""
    from entmaxkv_compile.metrics import full_entmax_decode

    q, k, v = _cache(2, nmax=48)
    seqlens = torch.tensor([20, 9], dtype=torch.int32)
    config = EntmaxKVConfig(selector="certified", page_size=8)
    decoder = Decoder.for_cache(k, q.shape[1], config)
    decoder.prefill(k, seqlens)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        pos = seqlens.clone()
        k[torch.arange(2), :, pos.long()] = torch.randn(2, 2, 16, generator=gen)
        v[torch.arange(2), :, pos.long()] = torch.randn(2, 2, 16, generator=gen)
        decoder.append(k, pos)
        seqlens = pos + 1
        step_q = torch.randn(q.shape, generator=gen)
        result = decoder.run(step_q, k, v, seqlens)
        full, _ = full_entmax_decode(step_q.double(), k.double(), v.double(), seqlens, 1.5, 0.25)
        assert result.certified.all()
        assert torch.allclose(result.out.double(), full, atol=1e-5)


def test_out_of_order_append_is_never_certified_and_still_exact():
    from entmaxkv_compile.metrics import full_entmax_decode

    q, k, v = _cache(4)
    seqlens = torch.tensor([30, 30], dtype=torch.int32)
    decoder = Decoder.for_cache(k, q.shape[1], EntmaxKVConfig(selector="certified", page_size=8))
    decoder.prefill(k, seqlens)
    # Sequence 0 writes rows 30..47 but appends only row 47: page 4 (rows 32..39, given a strong
    # match with the query) never reaches the statistics, whose zeros would bound it below tau.
    k[0, :, 32:40] = 4.0 * q[0, ::2, 0][:, None, :]
    decoder.append(k, torch.tensor([47, 30], dtype=torch.int32))
    lengths = torch.tensor([48, 31], dtype=torch.int32)
    result = decoder.run(q, k, v, lengths)
    assert not result.certified[0].any() and result.certified[1].all()
    full, _ = full_entmax_decode(q.double(), k.double(), v.double(), lengths, 1.5, 0.25)
    assert torch.allclose(result.out.double(), full, atol=1e-5)  # sequence 0 read every page


@pytest.mark.parametrize("change, error, match", [
    (dict(q_heads=3), ValueError, "multiple of kv_heads"),
    (dict(batch=0), ValueError, "batch must be a positive int"),
    (dict(dtype=torch.int32), TypeError, "dtype must be one of"),
    (dict(config="certified"), TypeError, "config must be an EntmaxKVConfig"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
])
def test_plan_rejects_bad_arguments(change, error, match):
    plan = dict(config=None, batch=2, q_heads=4, kv_heads=2, head_dim=16, capacity=64,
                dtype=torch.float32, device="cpu")
    plan.update(change)
    config = plan.pop("config")
    with pytest.raises(error, match=match):
        Decoder(config, **plan)


def test_adopted_stats_must_match_the_plan():
    q, k, v = _cache(5)
    stats = KVPageStats.from_cache(k, torch.tensor([64, 64], dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="page_size"):
        Decoder.for_cache(k, 4, EntmaxKVConfig(page_size=8), stats=stats)
    with pytest.raises(ValueError, match="does not match these stats"):
        Decoder.for_cache(k[:, :, :32], 4, EntmaxKVConfig(page_size=16), stats=stats)


def test_check_names_a_step_that_does_not_fit_the_plan():
    q, k, v = _cache(6)
    decoder = Decoder.for_cache(k, q.shape[1])
    seqlens = torch.tensor([64, 64], dtype=torch.int32)
    decoder.check(q, k, v, seqlens)
    with pytest.raises(ValueError, match="planned for q"):
        decoder.check(q[:1], k[:1], v[:1], seqlens[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")
def test_graph_replay_of_append_and_run_equals_eager_for_1000_steps():
    batch, hq, hkv, nmax, dim = 2, 32, 8, 4096, 128
    q, k, v = _cache(7, batch, hq, hkv, nmax, dim, torch.float16, "cuda")
    start = torch.tensor([1000, 1517], dtype=torch.int32, device="cuda")
    config = EntmaxKVConfig(selector="certified")
    eager = Decoder.for_cache(k, hq, config, cuda_graph=False)
    graphed = Decoder.for_cache(k, hq, config, cuda_graph=False)
    k2, v2 = k.clone(), v.clone()
    eager.prefill(k, start)
    graphed.prefill(k2, start)
    pos = start.clone()
    step_q = q.clone()
    new_k = torch.empty(batch, hkv, dim, device="cuda", dtype=k.dtype)
    new_v = torch.empty_like(new_k)
    rows = torch.arange(batch, device="cuda")

    def step(decoder, kc, vc):
        kc[rows, :, pos.long()] = new_k
        vc[rows, :, pos.long()] = new_v
        decoder.append(kc, pos)
        return decoder.run(step_q, kc, vc, pos + 1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(graphed, k2.clone(), v2.clone())  # warm-up (compiles the kernels) on scratch caches
    torch.cuda.current_stream().wait_stream(stream)
    graphed.prefill(k2, start)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(graphed, k2, v2)
    graphed.prefill(k2, start)  # capture ran no kernels: restart from the prefilled state
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(1000):
        step_q.copy_(torch.randn(step_q.shape, generator=gen, device="cuda"))
        new_k.copy_(torch.randn(new_k.shape, generator=gen, device="cuda"))
        new_v.copy_(torch.randn(new_v.shape, generator=gen, device="cuda"))
        want = step(eager, k, v)
        graph.replay()
        assert torch.equal(captured.out, want.out) and torch.equal(captured.certified, want.certified)
        pos += 1
    assert math.isfinite(float(captured.out.float().abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")
@pytest.mark.parametrize("selector", ["gaussian", "certified"])
def test_run_replaying_its_own_graph_equals_eager_and_keeps_results(selector):
    """``run`` on a GPU records itself once per cache and replays: the same results as the eager
    step after appends, a second cache gets its own recording, and a result kept from an earlier
    step is not overwritten by later ones."""
    batch, hq, hkv, nmax, dim = 2, 8, 2, 2048, 64
    q, k, v = _cache(8, batch, hq, hkv, nmax, dim, torch.float16, "cuda")
    start = torch.tensor([700, 1301], dtype=torch.int32, device="cuda")
    config = EntmaxKVConfig(selector=selector)
    eager = Decoder.for_cache(k, hq, config, cuda_graph=False)
    graphed = Decoder.for_cache(k, hq, config)
    eager.prefill(k, start)
    graphed.prefill(k, start)
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = torch.arange(batch, device="cuda")
    pos, kept = start.clone(), []
    for _ in range(20):
        k[rows, :, pos.long()] = torch.randn(batch, hkv, dim, generator=gen, device="cuda").half()
        v[rows, :, pos.long()] = torch.randn(batch, hkv, dim, generator=gen, device="cuda").half()
        eager.append(k, pos)
        graphed.append(k, pos)
        step_q = torch.randn(q.shape, generator=gen, device="cuda").half()
        want, got = eager.run(step_q, k, v, pos + 1), graphed.run(step_q, k, v, pos + 1)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        kept.append((got.out, want.out))
        pos += 1
    assert all(torch.equal(a, b) for a, b in kept)

    def caches_recorded():  # a recording per cache (and per form of the step: certified has two)
        return {key[:4] for key in graphed._graphed.recordings}

    assert len(caches_recorded()) == 1
    other_k, other_v = k.clone(), v.clone()
    got = graphed.run(q, other_k, other_v, pos)
    assert len(caches_recorded()) == 2
    assert torch.equal(got.out, eager.run(q, other_k, other_v, pos).out)
