"""Matching: entmax/softmax/hand-written weights, attention spellings, KV writes, refusals."""

from __future__ import annotations

import pytest
import torch

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.compiler.passes import BOOKKEEPING, NOT_ENTMAX, REFUSED, REWRITTEN, analyze
from entmaxkv_compile.compiler.passes.match_entmax import find_weight_sites
from entmaxkv_compile.compiler.passes.match_kv_write import CONCAT_REASON
from examples.zoo import gpt_fast
from examples.zoo.tracing import capture_graphs

CONFIG = EntmaxKVConfig()


def _model(seed=0, batch=2, **args):
    return gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, **args), batch=batch, seed=seed)


def _decode_plan(model, prompt_len=11, batch=2, seed=0):
    """Prefill eagerly, then analyze the Dynamo graph of one decode step."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.args.vocab_size, (batch, prompt_len), generator=gen)
    with torch.no_grad():
        model(prompt, torch.arange(prompt_len))
    [(gm, inputs)] = capture_graphs(model, prompt[:, -1:], torch.tensor([prompt_len]))
    return analyze(gm, inputs, CONFIG), gm


SPELLINGS = [
    dict(),
    dict(scores="einsum", mask="additive", kv_write="index_copy"),
    dict(scores="bmm", gqa="expand", scale_on="q"),
    dict(scores="baddbmm", n_head=8, n_kv_head=2),
    dict(scores="matmul", mask="where", gqa="expand", n_head=6, n_kv_head=3, dim=48),
    dict(alibi="half", rope=False, n_kv_head=4),
    dict(alibi="all", rope=False, scores="baddbmm", weights="bisect_1.25"),
    dict(weights="sparsemax", n_head=4, n_kv_head=1, kv_write="index_copy"),
    dict(weights="bisect_4/3_module", scale_on="q", scores="einsum"),
    dict(weights="own_entmax_2", mask="where"),
    dict(weights="entmax15_module", scores="bmm", mask="where"),
]


_IDS = [",".join(f"{k}={v}" for k, v in s.items()) or "default" for s in SPELLINGS]


@pytest.mark.parametrize("spelling", SPELLINGS, ids=_IDS)
def test_decode_attention_spellings_are_rewritten(spelling):
    batch = 1 + len(spelling) % 3
    model = _model(seed=len(spelling), batch=batch, **spelling)
    plan, _ = _decode_plan(model, prompt_len=7 + len(spelling), batch=batch)
    [site] = plan.sites
    assert site.status == REWRITTEN, site.reason
    assert site.phase == "decode" and site.where == "layers.0.attention"
    from examples.zoo.weights import WEIGHTS
    assert site.alpha == pytest.approx(WEIGHTS[model.args.weights][1])
    [action] = plan.actions
    expected_scale = model.args.temperature / model.args.head_dim ** 0.5
    assert action.match.scale == pytest.approx(expected_scale)
    if model.args.alibi == "none":
        assert action.slopes is None
    else:
        torch.testing.assert_close(action.slopes, gpt_fast.alibi_slopes(model.args.n_head, model.args.alibi),
                                   atol=1e-5, rtol=1e-4)


def test_prefill_gets_bookkeeping_only():
    model = _model()
    [(gm, inputs)] = capture_graphs(model, torch.randint(0, 96, (2, 9)), torch.arange(9))
    [site] = analyze(gm, inputs, CONFIG).sites
    assert (site.status, site.phase) == (BOOKKEEPING, "prefill")


def test_symbolic_query_length_is_not_taken_for_decode():
    model = _model()
    graphs = []
    for length in (5, 7):  # the second length makes Dynamo mark the sequence axis dynamic
        model.setup_caches(2)
        graphs += capture_graphs(model, torch.randint(0, 96, (2, length)), torch.arange(length))
    gm, inputs = graphs[-1]
    [site] = analyze(gm, inputs, CONFIG).sites
    assert site.status == BOOKKEEPING, site.reason


def test_hand_written_entmax_is_confirmed_and_lookalike_is_not():
    plan, _ = _decode_plan(_model(weights="handwritten"))
    [site] = plan.sites
    assert (site.kind, site.status, site.alpha) == ("hand-written entmax", REWRITTEN, 1.5)
    plan, _ = _decode_plan(_model(weights="not_quite"))
    [site] = plan.sites
    assert (site.kind, site.status, site.alpha) == ("hand-written entmax", NOT_ENTMAX, None)
    assert "not entmax" in site.reason and not plan.actions


def test_softmax_is_reported_and_never_touched():
    plan, _ = _decode_plan(_model(weights="softmax"))
    [site] = plan.sites
    assert (site.kind, site.status) == ("softmax", NOT_ENTMAX)
    assert not plan.changes_graph


@pytest.mark.parametrize("source", ["entmax package", "hand-written"])
def test_inlined_entmax_in_an_aten_graph_is_found_structurally(source):
    import entmax
    from examples.zoo.weights import handwritten_entmax15

    weights = (lambda s: entmax.entmax15(s, dim=-1)) if source == "entmax package" else handwritten_entmax15
    scores, v = torch.randn(2, 3, 1, 20), torch.randn(2, 3, 20, 4)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda s, v: weights(s) @ v)(scores, v)
    [site] = find_weight_sites(gm)
    assert (site.kind, site.confirmed, site.alpha) == ("hand-written", True, 1.5)


class _ConcatCache(torch.nn.Module):
    """HF DynamicCache-style attention: past keys concatenated with the new one."""

    def forward(self, q, k_past, v_past, k_new, v_new):
        import entmax

        k = torch.cat([k_past, k_new], dim=2)
        v = torch.cat([v_past, v_new], dim=2)
        return entmax.entmax15(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def test_concatenating_cache_is_refused_with_reason():
    args = (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
            torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    [(gm, inputs)] = capture_graphs(_ConcatCache(), *args)
    [site] = analyze(gm, inputs, CONFIG).sites
    assert site.status == REFUSED and site.reason == CONCAT_REASON


class _SlidingWindow(torch.nn.Module):
    """A static cache with a sliding-window mask (``sink``: key 0 stays shown, a hole below the window)."""

    def __init__(self, window, sink=False):
        super().__init__()
        self.window, self.sink = window, sink
        self.register_buffer("k", torch.randn(1, 2, 32, 8))
        self.register_buffer("v", torch.randn(1, 2, 32, 8))

    def forward(self, q, k_new, v_new, pos):
        import entmax

        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        j = torch.arange(32)
        keep = (j <= pos) & ((j > pos - self.window) | (self.sink & (j == 0)))
        scores = (q @ self.k.transpose(-2, -1) * 0.3).masked_fill(~keep, float("-inf"))
        return entmax.entmax15(scores, dim=-1) @ self.v


@pytest.mark.parametrize("window, sink, status, reason", [
    (64, False, REWRITTEN, ""), (4, False, REWRITTEN, "sliding window 4"),
    (4, True, REFUSED, "hides positions already written"),
])
def test_masks_that_hide_written_rows_are_a_window_or_refused(window, sink, status, reason):
    args = (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.tensor([9]))
    [(gm, inputs)] = capture_graphs(_SlidingWindow(window, sink), *args)
    [site] = analyze(gm, inputs, CONFIG).sites
    assert site.status == status and reason in site.reason, site.reason
    if window >= 32:  # wider than the cache: hides nothing, proved causal without a window
        assert "sliding window" not in site.reason


def test_config_alpha_conflict_is_refused():
    _, gm = _decode_plan(_model())
    site = analyze(gm, None, EntmaxKVConfig(alpha=2.0)).sites[0]
    assert site.status == REFUSED and "differs from the configured alpha" in site.reason


def test_export_aten_graph_is_matched_on_the_same_ir():
    """torch.export (no Dynamo capture): entmax15 is inlined into aten ops and found structurally."""
    model = _model(kv_write="index_copy")
    prompt = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        model(prompt, torch.arange(10))
    program = torch.export.export(model, (prompt[:, -1:], torch.tensor([10])))
    gm = program.module()
    before = model.layers[0].attention.kv_cache.k_cache.clone()
    plan = analyze(gm, [prompt[:, -1:], torch.tensor([10])], CONFIG)
    [site] = plan.sites
    assert (site.kind, site.status, site.phase) == ("hand-written entmax", REWRITTEN, "decode"), site.reason
    assert torch.equal(gm.get_buffer("layers.0.attention.kv_cache.k_cache"), before), "analysis wrote the cache"
    [site] = analyze(gm, None, CONFIG).sites
    assert site.status == REFUSED and "numerically" in site.reason


@pytest.mark.parametrize("slope", [0.0, 0.37])
def test_rounded_scores_over_a_long_context_are_not_taken_for_a_mask(slope):
    """The written rows' bias (scores minus the float64 recomputation) at 512k positions: rounding
    of bfloat16-sized magnitude on top of no bias or an ALiBi line is not a hidden row, one row
    pushed 1e4 down is (a false refusal here left one layer of a 512k model on dense attention)."""
    from entmaxkv_compile.compiler.passes.verify import _hides_written_rows

    gen = torch.Generator().manual_seed(0)
    length = 524288 + 37
    j = torch.arange(length, dtype=torch.float64) - (length - 1)
    noise = 0.0625 * torch.randint(-1, 2, (2, 3, length), generator=gen, dtype=torch.float64)
    noise[..., -2] = 0.0625  # the last two rows' rounding differs by an ulp of a score near 10
    noise[..., -1] = 0.0
    valid = slope * j + noise
    assert not _hides_written_rows(valid)
    hidden = valid.clone()
    hidden[1, 2, 1234] -= 1e4
    assert _hides_written_rows(hidden)
    hidden[1, 2, 1234] = float("-inf")
    assert _hides_written_rows(hidden)
