"""Ragged decode batches: one position per sequence (``input_pos [B]``), proved row by row."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from entmaxkv_compile.compiler.explain import recording
from entmaxkv_compile.compiler.passes import analyze
from entmaxkv_compile.compiler.passes.static_state import STATS
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from examples.zoo import ZOO, gpt_fast
from examples.zoo.tracing import capture_graphs

OPTIONS = {"compiler": "eager", "selector": "certified", "certify_max_rounds": 1}
BATCH, HEADS, SLOTS, DIM = 3, 3, 32, 8


class _RaggedStep(torch.nn.Module):
    """One attention step over a static cache, each sequence at its own position ``pos[b]``.

    ``write``: ``rows`` (``k[arange(B), :, pos] = k_new``), ``all`` (``k[:, :, pos] = k_new``: every
    row at every position of ``pos``), ``row0`` (``k[zeros(B), :, pos]``: every sequence into row 0),
    ``scatter`` (``k.scatter_(2, pos.view(B, 1, 1, 1).expand(B, H, 1, D), k_new)``), ``scatter_heads``
    (the same with an index ``[B, 1, 1, D]``: only head 0 is written).
    ``mask``: ``own`` (``j <= pos[b]``), ``ahead`` (``j <= pos[b] + 1``), ``first`` (``j <= pos[0]``),
    ``heads`` (``pos`` laid along the head axis), ``other`` (built from a second position input),
    ``input`` (a mask passed in).
    """

    def __init__(self, write: str = "rows", mask: str = "own") -> None:
        super().__init__()
        self.write, self.mask = write, mask
        self.register_buffer("k", torch.randn(BATCH, HEADS, SLOTS, DIM))
        self.register_buffer("v", torch.randn(BATCH, HEADS, SLOTS, DIM))

    def forward(self, q, k_new, v_new, pos, other=None):
        import entmax

        rows = torch.arange(BATCH) if self.write != "row0" else torch.zeros(BATCH, dtype=torch.long)
        if self.write == "all":
            self.k[:, :, pos] = k_new
            self.v[:, :, pos] = v_new
        elif self.write in ("scatter", "scatter_heads"):  # heads: index [B, 1, 1, D] writes head 0 only
            index = pos.view(BATCH, 1, 1, 1).expand(BATCH, HEADS if self.write == "scatter" else 1, 1, DIM)
            self.k.scatter_(2, index, k_new)
            self.v.scatter_(2, index, v_new)
        else:
            self.k[rows, :, pos] = k_new[:, :, 0]
            self.v[rows, :, pos] = v_new[:, :, 0]
        j = torch.arange(SLOTS).view(1, 1, 1, SLOTS)
        scores = q @ self.k.transpose(-2, -1) * 0.5
        if self.mask == "input":
            scores = scores.masked_fill(~other, float("-inf"))
        else:
            i = {"own": lambda: pos.view(BATCH, 1, 1, 1), "ahead": lambda: pos.view(BATCH, 1, 1, 1) + 1,
                 "first": lambda: pos[0].view(1, 1, 1, 1), "heads": lambda: pos.view(1, HEADS, 1, 1),
                 "other": lambda: other.view(BATCH, 1, 1, 1)}[self.mask]()
            scores = scores.masked_fill(~(j <= i), float("-inf"))
        return entmax.entmax15(scores, dim=-1) @ self.v


def _step_args(pos):
    generator = torch.Generator().manual_seed(int(sum(pos)))
    return tuple(torch.randn(BATCH, HEADS, 1, DIM, generator=generator) for _ in range(3)) + (torch.tensor(pos),)


@pytest.mark.parametrize("write, mask, status, reason", [
    ("rows", "own", "rewritten", "per-row positions: seqlens = positions + 1 for each sequence"),
    ("rows", "ahead", "refused", "key 1 is after position 0 but not hidden"),
    ("rows", "first", "refused", "picks or shifts rows of a per-row position"),
    ("rows", "heads", "refused", "vary with a per-row position along an axis other than the batch axis"),
    ("rows", "other", "refused", "the mask is built from"),
    ("all", "own", "refused", "decode writes more than one position per step, and not one per row"),
    ("row0", "own", "refused", "the row index of the K write is not proved to be arange(B)"),
    ("scatter", "own", "rewritten", "per-row positions"),
    ("scatter", "ahead", "refused", "key 1 is after position 0 but not hidden"),
    ("scatter_heads", "own", "refused", "does not write a whole row of every sequence"),
], ids=["per-row-causal", "mask-ahead", "mask-of-row-0", "positions-on-heads", "mask-from-other-input",
        "write-all-rows", "write-into-row-0", "scatter", "scatter-mask-ahead", "scatter-one-head"])
def test_per_row_sites_are_rewritten_only_when_every_row_is_causal_at_its_own_position(write, mask, status, reason):
    args = _step_args([9, 4, 17])
    extra = (torch.tensor([9, 4, 17]),) if mask == "other" else ()
    [(gm, inputs)] = capture_graphs(_RaggedStep(write, mask), *args, *extra)
    [site] = analyze(gm, inputs, EntmaxKVConfig()).sites
    assert site.status == status and reason in site.reason, site.reason


def test_per_row_mask_input_is_refused_the_guard_takes_one_position():
    args = _step_args([9, 4, 17])
    mask = torch.arange(SLOTS).view(1, 1, 1, SLOTS) <= args[3].view(BATCH, 1, 1, 1)
    [(gm, inputs)] = capture_graphs(_RaggedStep("rows", "input"), *args, mask)
    [site] = analyze(gm, inputs, EntmaxKVConfig(), allow_guards=True).sites
    assert site.status == "refused" and "positions are per row" in site.reason, site.reason


def _assert_rewritten_and_exact(build, *, steps: int, last: int) -> None:
    """A step built by ``build`` compiled with the backend equals its eager twin for ``steps``
    steps at rows starting at positions 9, 0 and ``last`` (different pages and page offsets, a
    row at position 0 included), and its one site is rewritten."""
    torch.manual_seed(0)
    eager, model = build(), build()
    model.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options={**OPTIONS, "page_size": 4})
    with recording() as report:
        for step in range(steps):
            args = _step_args([9 + step, step, last + step])
            torch.testing.assert_close(compiled(*args), eager(*args), atol=1e-6, rtol=0)
    [graph] = report.graphs
    assert graph.changed and [s.status for s in graph.sites] == ["rewritten"], graph.sites


@pytest.mark.parametrize("write", ["rows", "scatter"])
def test_per_row_step_matches_the_model_at_positions_spread_over_pages(write):
    """Rows at different pages and page offsets, each advancing, a row at position 0 included."""
    _assert_rewritten_and_exact(lambda: _RaggedStep(write), steps=6, last=21)


def test_ragged_zoo_statistics_are_kept_per_row():
    """After ragged greedy decoding every row's page statistics are in order and equal to
    statistics recomputed from that row's own tokens (min/max exactly)."""
    entry = ZOO["ragged_positions"]
    model = entry.build()
    prompt = torch.randint(1, 96, (entry.batch, 12), generator=torch.Generator().manual_seed(5))
    lengths = gpt_fast.ragged_lengths(entry.batch, 12)
    steps = 16
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options={**OPTIONS, "page_size": 4})
    gpt_fast.generate_ragged(model, prompt, lengths, steps, decode=compiled)
    written = lengths + steps
    for layer in model.layers:
        cache = layer.attention.kv_cache.k_cache
        stats = STATS.lookup(cache, 4)
        assert stats is not None
        assert torch.equal(stats.valid, torch.ones(entry.batch, dtype=torch.bool))
        assert torch.equal(stats.last_position, written - 1)
        fresh = KVPageStats.allocate(*cache.shape, page_size=4, dtype=cache.dtype)
        fresh.prefill(cache, written)
        for name, got, want in zip(("kmin", "kmax", "kmean", "km2"), stats.buffers(), fresh.buffers()):
            for b, length in enumerate(written.tolist()):
                pages = -(-length // 4)
                if name in ("kmin", "kmax"):
                    assert torch.equal(got[b, :, :pages], want[b, :, :pages]), (name, b)
                else:
                    torch.testing.assert_close(got[b, :, :pages], want[b, :, :pages], atol=1e-5, rtol=1e-5)


def test_shared_position_decode_is_unchanged_by_a_per_row_capable_model():
    """The per-row model's prefill and a batch at one shared position still take the shared form."""
    args = dataclasses.replace(ZOO["ragged_positions"].build().args, positions="shared")
    model = gpt_fast.build(args, batch=3)
    with torch.no_grad():
        model(torch.randint(1, 96, (3, 12)), torch.arange(12))
    [(gm, inputs)] = capture_graphs(model, torch.randint(1, 96, (3, 1)), torch.tensor([12]))
    sites = analyze(gm, inputs, EntmaxKVConfig()).sites
    assert [s.status for s in sites] == ["rewritten"] * 2
    assert all("per-row" not in s.reason for s in sites)


@pytest.mark.parametrize("name", ["ragged_positions", "ragged_alibi_buffer"])
def test_offline_rewrite_of_a_ragged_step_reproduces_the_model(name, tmp_path):
    """The exported step (``buf[rows, :, pos] = k`` becomes ``aten.index_put_`` with ``[rows, None, pos]``;
    the other model writes by ``scatter_``)."""
    import copy

    from entmaxkv_compile.compiler.rewrite import rewrite

    entry = ZOO[name]
    model = entry.build()
    prompt = torch.randint(1, 96, (entry.batch, 12), generator=torch.Generator().manual_seed(5))
    lengths = gpt_fast.ragged_lengths(entry.batch, 12)
    with torch.no_grad():
        model(prompt, torch.arange(12))
    eager = copy.deepcopy(model)
    token = torch.randint(1, 96, (entry.batch, 1), generator=torch.Generator().manual_seed(6))
    result = rewrite(model, (token, lengths.clone()), EntmaxKVConfig(selector="certified", page_size=4))
    assert [s.status for s in result.report.sites] == ["rewritten"] * entry.layers
    assert all("per-row positions" in s.reason for s in result.report.sites)
    loaded = torch.export.load(str(result.save(tmp_path / "step.pt2"))).module()
    with torch.no_grad():
        want_token, got_token = token, token.clone()
        for step in range(6):  # rows cross page boundaries at different steps
            want, got = eager(want_token, lengths + step), loaded(got_token, lengths + step)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            want_token, got_token = want[:, -1].argmax(-1, keepdim=True), got[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("name", ["ragged_positions", "ragged_alibi_buffer"])
def test_ragged_bf16_decode_gives_the_models_tokens(name):
    """bf16 rounding must not refuse the rewrite (ALiBi slopes fitted per group of equal-length rows
    agree within the fit's tolerance), and certified decoding keeps the model's greedy tokens."""
    entry = ZOO[name]
    args = entry.build().args
    reference, model = (gpt_fast.build(args, batch=entry.batch, dtype=torch.bfloat16) for _ in range(2))
    prompt = torch.randint(1, 96, (entry.batch, 12), generator=torch.Generator().manual_seed(11))
    lengths = gpt_fast.ragged_lengths(entry.batch, 12)
    want, _ = gpt_fast.generate_ragged(reference, prompt, lengths, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options=OPTIONS)
    with recording() as report:
        tokens, _ = gpt_fast.generate_ragged(model, prompt, lengths, 16, decode=compiled)
    assert [s.status for s in report.sites] == ["rewritten"] * entry.layers, report.sites
    assert torch.equal(tokens, want)


class _FusedRaggedStep(torch.nn.Module):
    """K and V in one buffer ``kv[2, B, H, N, D]``, each part written per row: ``kv[0][rows, :, pos] = k``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kv", torch.randn(2, BATCH, HEADS, SLOTS, DIM))

    def forward(self, q, k_new, v_new, pos):
        import entmax

        rows = torch.arange(BATCH)
        self.kv[0][rows, :, pos] = k_new[:, :, 0]
        self.kv[1][rows, :, pos] = v_new[:, :, 0]
        j = torch.arange(SLOTS).view(1, 1, 1, SLOTS)
        scores = (q @ self.kv[0].transpose(-2, -1) * 0.5).masked_fill(~(j <= pos.view(BATCH, 1, 1, 1)), float("-inf"))
        return entmax.entmax15(scores, dim=-1) @ self.kv[1]


def test_fused_buffer_written_per_row_through_its_parts():
    _assert_rewritten_and_exact(_FusedRaggedStep, steps=5, last=20)
