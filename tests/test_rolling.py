"""Rolling-buffer caches (Mistral: ``W`` slots, position ``x`` written at slot ``x % W``): proved for
every position, decoded over ``min(x + 1, W)`` slots with the written page's statistics rebuilt,
exact and certified past several wraps; other moduli, windows and ALiBi over one refused."""

from __future__ import annotations

import pytest
import torch
from sympy import Piecewise, oo

from entmaxkv_compile.compiler.explain import recording
from entmaxkv_compile.compiler.passes import analyze
from entmaxkv_compile.compiler.passes.proofs import J, W, decide_causal
from entmaxkv_compile.compiler.passes.symbolic import QK, Unproven
from conftest import on_kernel_device
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.runtime import kernels, step
from entmaxkv_compile.runtime.stats import reference as cache
from entmaxkv_compile.runtime.stats import rolling
from examples.zoo import gpt_fast
from examples.zoo.tracing import capture_graphs

SLOTS, PAGE, PROMPT = 13, 4, 6  # 13 slots: not a multiple of the page size
STEPS = 3 * SLOTS + 3  # positions 6..47: the buffer wraps three times
ARGS = gpt_fast.ModelArgs(n_layer=1, rolling=SLOTS)


class _StepSpy:
    """Wraps ``step.run_step`` (what every ``decode_step`` runs) and records each step's certificate,
    lengths and whether the page statistics it was given equal a prefill of its cache from scratch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.certified: list[bool] = []
        self.fresh_stats: list[bool] = []
        self.lengths: list[list[int]] = []
        self._run = step.run_step
        monkeypatch.setattr(step, "run_step", self)

    def __call__(self, impl, q, k_cache, v_cache, seqlens, stats, *args, **kwargs):
        result = self._run(impl, q, k_cache, v_cache, seqlens, stats, *args, **kwargs)
        scratch = cache.KVPageStats.allocate(*k_cache.shape, page_size=PAGE, dtype=k_cache.dtype)
        cache.stats_prefill_(k_cache, seqlens, PAGE, *scratch.buffers())
        self.fresh_stats.append(torch.equal(stats[0], scratch.kmin) and torch.equal(stats[1], scratch.kmax)
                                and torch.allclose(stats[2], scratch.kmean, atol=1e-6)
                                and torch.allclose(stats[3], scratch.km2, atol=1e-5))
        self.certified.append(bool(result[3].all()))
        self.lengths.append(seqlens.tolist())
        return result


@pytest.mark.parametrize("selector", ["dense", "certified"])
def test_rolling_decode_is_exact_and_certified_past_three_wraps(selector, monkeypatch):
    """Prompt shorter than the buffer, 42 greedy steps (three wraps), batch 2: the uncompiled
    model's tokens and logits (1e-5), every step certified, its statistics equal to a prefill from
    scratch and its lengths ``min(position + 1, slots)``."""
    reference, model = gpt_fast.build(ARGS), gpt_fast.build(ARGS)
    prompt = torch.randint(1, 96, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    want_tokens, want_logits = gpt_fast.generate(reference, prompt, STEPS)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv",
                             options={"compiler": "eager", "selector": selector, "page_size": PAGE})
    spy = _StepSpy(monkeypatch)
    with recording() as report:
        tokens, logits = gpt_fast.generate(model, prompt, STEPS, decode=compiled, prefill=compiled)
    prefill, decode = report.graphs
    assert [s.status for s in prefill.sites] == ["bookkeeping"]
    [site] = decode.sites
    assert site.status == "rewritten" and "page_stats_rebuild" in site.reason
    assert f"rolling buffer of {SLOTS} slots written at position % {SLOTS}" in site.reason
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    positions = range(PROMPT, PROMPT + STEPS)
    assert spy.lengths == [[min(p + 1, SLOTS)] * 2 for p in positions]
    assert all(spy.certified) and all(spy.fresh_stats) and len(spy.certified) == STEPS


def test_rolling_cache_first_seen_at_a_decode_step_catches_up_after_wrapping(monkeypatch):
    """An uncompiled prefill longer than the buffer (it wrapped already): the decode graph's catch-up
    fills the statistics from all the slots, and the steps stay exact and certified."""
    reference, model = gpt_fast.build(ARGS), gpt_fast.build(ARGS)
    prompt = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # positions 0..8 and again 9..17: the second chunk wraps the 13 slots
        for m in (reference, model):
            m(prompt, torch.arange(9))
    steps, start = 16, 18
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv",
                             options={"compiler": "eager", "selector": "certified", "page_size": PAGE})
    spy = _StepSpy(monkeypatch)
    token = prompt[:, -1:]
    with torch.no_grad():
        for step in range(steps):
            position = torch.tensor([start + step])
            want = reference(token, position)
            torch.testing.assert_close(compiled(token, position), want, atol=1e-5, rtol=0)
            token = want.argmax(-1)
    assert all(spy.certified) and all(spy.fresh_stats) and len(spy.certified) == steps


def _site(model: torch.nn.Module, position: int):
    prompt = torch.randint(1, 96, (1, position), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(prompt, torch.arange(position))
    [(gm, inputs)] = capture_graphs(model, prompt[:, -1:], torch.tensor([position]))
    [site] = analyze(gm, inputs, EntmaxKVConfig(page_size=PAGE), allow_guards=True).sites
    return site


class _OtherModulus(torch.nn.Module):
    """A cache of 16 slots written at ``pos % 12`` under a mask ``j <= pos``: not a rolling buffer
    (``mask_from_slot``: the mask is ``j <= pos % modulus``, the slot itself)."""

    def __init__(self, modulus: int = 12, mask_from_slot: bool = False) -> None:
        super().__init__()
        self.modulus, self.mask_from_slot = modulus, mask_from_slot
        self.emb = torch.nn.Embedding(96, 8)
        self.register_buffer("k", torch.zeros(1, 1, 16, 8))
        self.register_buffer("v", torch.zeros(1, 1, 16, 8))

    def forward(self, idx, pos):
        import entmax

        x = self.emb(idx)[:, None]  # [1, 1, T, 8]
        self.k[:, :, pos % self.modulus] = x
        self.v[:, :, pos % self.modulus] = -x
        scores = x @ self.k.transpose(-2, -1)
        shown_up_to = pos % self.modulus if self.mask_from_slot else pos
        scores = scores.masked_fill(torch.arange(16) > shown_up_to.view(-1, 1), float("-inf"))
        return entmax.entmax15(scores, dim=-1) @ self.v


@pytest.mark.parametrize("model, reason", [
    (lambda: _OtherModulus(12), "its modulus 12 is not the cache's slot count 16"),
    (lambda: gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, rolling=SLOTS, alibi="all", rope=False,
                                               mask="additive"), batch=1),
     "an ALiBi bias over a rolling buffer is not supported"),
    (lambda: gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, rolling=SLOTS, window=5), batch=1),
     "a sliding window over a rolling buffer is not supported"),
], ids=["other-modulus", "alibi", "window"])
def test_rolling_forms_that_are_not_supported_are_refused(model, reason):
    site = _site(model(), 8)
    assert site.status == "refused" and reason in site.reason, site.reason


def test_a_mask_built_from_the_slot_is_still_the_plain_causal_proof():
    """Masked from the slot it writes (``j <= pos % 16``), the cache attends slots ``0..slot``: the
    write index is the mask's position, proved as before, not read as a rolling buffer."""
    site = _site(_OtherModulus(16, mask_from_slot=True), 8)
    assert site.status == "rewritten" and "rolling" not in site.reason, site.reason


def test_decision_procedure_reads_a_rolling_mask_for_every_position():
    causal = Piecewise((QK, J <= W), (-oo, True))
    assert decide_causal(causal, SLOTS, rolling=True) is None
    with pytest.raises(Unproven, match="sliding window over a rolling buffer"):
        decide_causal(Piecewise((QK, (J <= W) & (W - J < 5)), (-oo, True)), SLOTS, rolling=True)
    with pytest.raises(Unproven, match="ALiBi bias over a rolling buffer"):
        decide_causal(Piecewise((QK + (J - W) / 2, J <= W), (-oo, True)), SLOTS, rolling=True)
    # hides every slot once the position passes 20: shown on the first slots' positions only
    with pytest.raises(Unproven, match="position 21"):
        decide_causal(Piecewise((QK, (J <= W) & (W <= 20)), (-oo, True)), SLOTS, rolling=True)


def _write_and_rebuild(rebuild, k, rows, positions):
    """Write ``rows[i]`` at slot ``positions[i] % slots`` and rebuild that page, position by position;
    returns the statistics' buffers ``(kmin, kmax, kmean, km2)``."""
    stats = cache.KVPageStats.allocate(*k.shape, page_size=PAGE, dtype=k.dtype, device=k.device)
    slots = k.shape[2]
    for i, position in enumerate(positions):
        slot = torch.full((k.shape[0],), position % slots, dtype=torch.int64, device=k.device)
        k[:, :, position % slots] = rows[i]
        rebuild(k, slot, rolling.rolling_seqlens(torch.full_like(slot, position), slots), PAGE, *stats.buffers())
    return stats.buffers()


def test_page_rebuild_equals_stats_from_scratch_after_wrapping_and_the_kernel_matches():
    """Rebuilding the written page after every write of three wraps leaves the statistics a prefill
    of the slots gives; the Triton kernel (interpreter) equals the reference at every step."""
    gen = torch.Generator().manual_seed(2)
    k = torch.zeros(2, 2, SLOTS, 8)
    positions = list(range(3 * SLOTS + 2))
    rows = torch.randn(len(positions), 2, 2, 8, generator=gen)
    got = _write_and_rebuild(rolling.stats_rebuild_page_, k.clone(), rows, positions)
    full = k.clone()
    for i, position in enumerate(positions):
        full[:, :, position % SLOTS] = rows[i]
    scratch = cache.KVPageStats.from_cache(full, torch.full((2,), SLOTS), PAGE).buffers()
    assert torch.equal(got[0], scratch[0]) and torch.equal(got[1], scratch[1])
    torch.testing.assert_close(got[2], scratch[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[3], scratch[3], atol=1e-5, rtol=0)
    # before a wrap: the written page counts only the rows written so far
    partial = _write_and_rebuild(rolling.stats_rebuild_page_, torch.zeros(2, 2, SLOTS, 8), rows, range(6))
    first = torch.zeros(2, 2, SLOTS, 8)
    first[:, :, :6] = rows[:6].permute(1, 2, 0, 3)
    prefix = cache.KVPageStats.from_cache(first, torch.full((2,), 6), PAGE).buffers()
    for field in range(4):
        torch.testing.assert_close(partial[field], prefix[field], atol=1e-6, rtol=0)

    kernel = on_kernel_device(_write_and_rebuild, kernels.stats_rebuild_page_, k.clone(), rows, positions)
    for field in range(4):
        torch.testing.assert_close(kernel[field], got[field], atol=1e-5, rtol=1e-5)


def test_rolling_order_rule_tracks_positions_across_wraps():
    """A wrap is in order, a repeat or rewind keeps the statistics sound, a skipped position does not."""
    last, valid = torch.tensor([SLOTS - 1, 30, 30, 30]), torch.ones(4, dtype=torch.bool)
    rolling.stats_track_rolling_(torch.tensor([SLOTS, 31, 30, 33]), last, valid)
    assert valid.tolist() == [True, True, True, False] and last.tolist() == [SLOTS, 31, 30, 33]
    assert cache.stats_valid_for(last, valid, rolling.rolling_seqlens(last, SLOTS))[:3].all()


def test_offline_rewrite_of_a_wrapped_rolling_buffer_reproduces_the_model():
    """The offline front door, rewritten after the buffer wrapped (position 17 > 13 slots): its
    statistics are prefilled from every slot, and the rewritten step decodes 16 more positions as
    the model does."""
    from entmaxkv_compile.compiler.rewrite import rewrite

    reference, model = gpt_fast.build(ARGS), gpt_fast.build(ARGS)
    prompt = torch.randint(1, 96, (2, 17), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for m in (reference, model):
            m(prompt[:, :9], torch.arange(9))
            m(prompt[:, 9:], torch.arange(9, 17))
    result = rewrite(model, (prompt[:, -1:], torch.tensor([17])), EntmaxKVConfig(selector="certified",
                                                                                 page_size=PAGE))
    assert [s.status for s in result.report.sites] == ["rewritten"]
    step = result.program.module()
    token = prompt[:, -1:]
    with torch.no_grad():
        for position in range(17, 33):
            want = reference(token, torch.tensor([position]))
            torch.testing.assert_close(step(token, torch.tensor([position])), want, atol=1e-5, rtol=0)
            token = want[:, -1].argmax(-1, keepdim=True)
