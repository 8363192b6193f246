"""The int8 key sketch inside the certified step (``config.certify_sketch="int8"``).

The step reads the pages whose token-level sketch bound exceeds the sketch's floor of the full
threshold: the output stays full entmax, every head certified, and far fewer pages are read on
keys whose page boxes are loose (iid keys here). The compiled paths refuse the option.
"""

import pytest
import torch

from entmaxkv_compile import EntmaxKVConfig, sparse_decode
from entmaxkv_compile.metrics import full_entmax_decode
from entmaxkv_compile.runtime.decoder import Decoder


def _case(seed, batch=2, hq=8, hkv=2, nmax=512, dim=32):
    """iid keys and a planted span: the exact support is the span (and a few outliers), but
    every page's box bound is far above tau."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv, 1, 1, dim, generator=gen, dtype=torch.float64)
    q = (q + 0.2 * torch.randn(batch, hkv, hq // hkv, 1, dim, generator=gen, dtype=torch.float64))
    q = q.reshape(batch, hq, 1, dim)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, nmax, dim, generator=gen, dtype=torch.float64)
    k[:, :, 100:116] += 1.5 * q[:, :: hq // hkv, 0][:, :, None, :]
    return q, k, v


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_sketch_keeps_certified_output_exact_and_reads_fewer_pages(alpha):
    q, k, v = _case(0)
    seqlens = torch.tensor([512, 437])
    scale = 1 / 32 ** 0.5
    full, _ = full_entmax_decode(q, k, v, seqlens, alpha, scale)
    read = {}
    for sketch in ("off", "int8"):
        config = EntmaxKVConfig(selector="certified", alpha=alpha, certify_sketch=sketch, certify_dense_above=1.0)
        result = sparse_decode(q, k, v, seqlens, config, scale=scale)
        assert result.certified.all() and (result.delta_bound == 0).all()
        assert torch.allclose(result.out, full, atol=1e-10)
        read[sketch] = int(result.num_selected.sum())
    assert read["int8"] < 0.5 * read["off"], read


def test_decoder_keeps_its_sketch_in_step_with_appends():
    q, k, v = _case(1, nmax=256)
    seqlens = torch.tensor([180, 97])
    config = EntmaxKVConfig(selector="certified", certify_sketch="int8", certify_dense_above=1.0)
    decoder = Decoder.for_cache(k, q.shape[1], config)
    decoder.prefill(k, seqlens)
    gen = torch.Generator().manual_seed(2)
    rows = torch.arange(2)
    for _ in range(12):
        pos = seqlens.clone()
        k[rows, :, pos] = 3.0 * torch.randn(2, 2, 32, generator=gen, dtype=torch.float64)
        v[rows, :, pos] = torch.randn(2, 2, 32, generator=gen, dtype=torch.float64)
        decoder.append(k, pos)
        seqlens = pos + 1
        step_q = q + 0.1 * torch.randn(q.shape, generator=gen, dtype=torch.float64)
        result = decoder.run(step_q, k, v, seqlens)
        full, _ = full_entmax_decode(step_q, k, v, seqlens, 1.5, 1 / 32 ** 0.5)
        assert result.certified.all() and torch.allclose(result.out, full, atol=1e-10)


def test_sketch_option_is_refused_where_it_is_not_implemented():
    config = EntmaxKVConfig(selector="certified", certify_sketch="int8")
    with pytest.raises(ValueError, match="certify_sketch"):
        config.check_compiled()
    from entmaxkv_compile.compiler.backend import BackendSettings

    with pytest.raises(ValueError, match="certify_sketch"):
        BackendSettings.parse({"selector": "certified", "certify_sketch": "int8"})
    with pytest.raises(ValueError, match="certify_sketch must be one of"):
        EntmaxKVConfig(certify_sketch="int4")
    q, k, v = _case(3, nmax=64)
    with pytest.raises(ValueError, match="used only with certify_sketch='int8' by the certified selector"):
        from entmaxkv_compile.runtime.sketch.reference import KeySketch

        Decoder.for_cache(k, q.shape[1], EntmaxKVConfig(), sketch=KeySketch.from_cache(k, torch.tensor([64, 64])))


def _support_pages(probs, hkv, page):
    """Pages per KV head holding a support token of some head of its group."""
    batch, hq, n = probs.shape
    pages = -(-n // page)
    padded = torch.nn.functional.pad(probs, (0, pages * page - n))
    return (padded.reshape(batch, hkv, hq // hkv, pages, page) > 0).any(-1).any(2).sum()


@pytest.mark.parametrize("alpha", [1.25, 4 / 3, 1.5, 1.75, 2.0])
@pytest.mark.parametrize("alibi", [False, True])
def test_sketch_selection_reads_near_the_support_and_stays_exact(alpha, alibi):
    """With a sketch the first selection is the pages whose sketch bound clears the sketch's
    floor of the full threshold (no gaussian estimate): exact on every head, and the pages read
    stay within a small factor of the pages that hold the support."""
    q, k, v = _case(3, batch=3, hq=12, hkv=3, dim=48)
    seqlens = torch.tensor([512, 301, 17])
    slopes = torch.linspace(0.01, 0.2, 12, dtype=torch.float64) if alibi else None
    scale = 1 / 48 ** 0.5
    full, probs = full_entmax_decode(q, k, v, seqlens, alpha, scale, alibi_slopes=slopes)
    config = EntmaxKVConfig(selector="certified", alpha=alpha, certify_sketch="int8", certify_dense_above=1.0)
    result = sparse_decode(q, k, v, seqlens, config, scale=scale, alibi_slopes=slopes)
    assert result.certified.all() and (result.delta_bound == 0).all()
    assert torch.allclose(result.out, full, atol=1e-10)
    support = int(_support_pages(probs, 3, config.page_size))
    assert int(result.num_selected.sum()) <= 3 * support, (int(result.num_selected.sum()), support)


def test_sketch_selection_never_certifies_over_a_non_finite_key():
    q, k, v = _case(4, nmax=128)
    k[1, 0, 40, 3] = float("nan")
    seqlens = torch.tensor([128, 128])
    config = EntmaxKVConfig(selector="certified", certify_sketch="int8", certify_dense_above=1.0)
    result = sparse_decode(q, k, v, seqlens, config, scale=0.2, check_values=False)
    assert result.certified[0].all()
    assert not result.certified[1, :4].any()


@pytest.mark.parametrize("selector", ["gaussian", "topk"])
@pytest.mark.parametrize("alpha", [1.5, 4 / 3, 1.75])
@pytest.mark.parametrize("planted", [True, False])
def test_token_level_delta_bound_holds_and_is_tighter(selector, alpha, planted):
    """An approximate selector that reports its bound with a sketch: the bound is never below
    the full-entmax mass its selection dropped (float64), never above the page-level bound, and
    a head it certifies (bound 0) is exact."""
    q, k, v = _case(5, batch=2, hq=8, hkv=2, nmax=384, dim=32)
    if not planted:  # iid keys: the selection drops some support, the bound must be positive
        k = torch.randn(k.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    seqlens = torch.tensor([384, 250])
    scale = 1 / 32 ** 0.5
    _, probs = full_entmax_decode(q, k, v, seqlens, alpha, scale)
    common = dict(selector=selector, alpha=alpha, report_bound=True, token_budget=64)
    coarse = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(**common), scale=scale)
    fine = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(**common, certify_sketch="int8"), scale=scale)
    assert torch.equal(coarse.num_selected, fine.num_selected)
    page = 16
    pages = probs.shape[-1] // page
    chosen = torch.zeros(2, 2, pages, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            chosen[b, h, fine.page_indices[b, h, : fine.num_selected[b, h]].long()] = True
    token_chosen = chosen.repeat_interleave(page, -1).repeat_interleave(4, 1)  # [B, Hq, N]
    dropped = torch.where(token_chosen, 0.0, probs).sum(-1)
    assert bool((fine.delta_bound.double() >= dropped - 1e-6).all())
    if not planted and selector == "topk":  # 64 of 384 iid tokens: some support is dropped
        assert bool((dropped > 1e-3).any()) and bool((fine.delta_bound > 0).any())
    assert bool((fine.delta_bound <= coarse.delta_bound).all())
    if planted:  # the span holds the support: the page boxes bound nothing, the tokens do
        assert float(fine.delta_bound.mean()) < 0.5 * max(float(coarse.delta_bound.mean()), 1e-9) or \
            bool((fine.delta_bound == 0).all())
    full, _ = full_entmax_decode(q, k, v, seqlens, alpha, scale)
    exact = fine.certified[..., None, None] & ~torch.isclose(fine.out, full, atol=1e-9)
    assert not bool(exact.any())


def test_sketch_selection_read_all_rows_stay_exact():
    """Rows that read every page (statistics out of order; the fallback's dense rows) skip the
    sketch's bound and stay exact: out-of-order rows are never certified, fallback rows are."""
    q, k, v = _case(8, nmax=128)
    seqlens = torch.tensor([100, 90])
    config = EntmaxKVConfig(selector="certified", certify_sketch="int8", certify_dense_above=0.0)
    decoder = Decoder.for_cache(k, q.shape[1], config)
    decoder.prefill(k, seqlens)
    decoder.append(k, torch.tensor([100, 60]))  # row 1 out of order: its statistics are invalid
    seqlens = torch.tensor([101, 90])
    full, _ = full_entmax_decode(q, k, v, seqlens, 1.5, 1 / 32 ** 0.5)
    for step in range(2):  # step 0 probes the bounds; dense_above=0 turns the fallback on after it
        result = decoder.run(q, k, v, seqlens)
        assert torch.allclose(result.out, full, atol=1e-10)
        assert result.certified[0].all() and not result.certified[1].any()
        assert int(result.num_selected[1].min()) == -(-90 // config.page_size)
    assert int(decoder.stats.certify_skip[0]) > 0  # row 0 ran as a fallback (dense) row on step 1
