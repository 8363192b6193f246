"""Decode sites are proved for every position from the graph (``passes/proofs.py``), not on one example."""

from __future__ import annotations

import dataclasses
import re

import pytest
import sympy
import torch
from sympy import And, Or, Piecewise, oo

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.compiler.explain import recording
from entmaxkv_compile.compiler.passes import analyze
from entmaxkv_compile.compiler.passes.proofs import J, W, decide_causal
from entmaxkv_compile.compiler.passes.symbolic import QK, Unproven
from examples.zoo import ZOO, gpt_fast
from examples.zoo.tracing import capture_graphs

OPTIONS = {"compiler": "eager", "selector": "certified", "certify_max_rounds": 1}

# ------------------------------------------------------------------- the decision procedure


def test_causal_masks_and_alibi_are_proved():
    decide_causal(Piecewise((QK, J <= W), (-oo, True)), 96)
    slope = sympy.Symbol("slope", real=True, finite=True)
    alibi = 0.25 * QK + slope * (J - W) + 3 * W  # a per-row constant (3 * w) changes nothing
    decide_causal(Piecewise((alibi, J < W + 1), (alibi - 3.4e38, True)), 96, {slope: 0.5})
    # a window as wide as the cache hides nothing: causal, no window
    assert decide_causal(Piecewise((QK, And(J <= W, W - J < 96)), (-oo, True)), 96) is None


@pytest.mark.parametrize("scores, window", [
    (Piecewise((QK, And(J <= W, W - J < 52)), (-oo, True)), 52),
    (Piecewise((QK, And(J <= W, J > W - 7)), (-oo, True)), 7),
    (Piecewise((QK, And(J <= W, W - J <= 7)), (-oo, True)), 8),  # <= W: one key more, proved as such
    (Piecewise((QK, And(J <= W, W - J < 95)), (-oo, True)), 95),  # hides key 0 at position 95 only
    (Piecewise((QK, And(J <= W, W - J < 1)), (-oo, True)), 1),  # the token itself only
    (Piecewise((QK + 0.5 * (J - W), And(J <= W, W - J < 9)), (QK - 3.4e38, True)), 9),  # ALiBi, additive
], ids=["mistral-52", "strict-7", "off-by-one-8", "one-short-of-the-cache", "one-key", "alibi"])
def test_sliding_windows_are_proved_with_their_width(scores, window):
    assert decide_causal(scores, 96) == window


@pytest.mark.parametrize("scores, message", [
    (Piecewise((QK, And(J <= W, Or(W - J < 20, J < 1))), (-oo, True)),
     "hides positions already written (key 1 at position 21) that a sliding window would show: a hole"),
    (Piecewise((QK, And(J <= W, J >= 5)), (-oo, True)), "hides positions already written (key 0 at position 0)"),
    (Piecewise((QK, And(J <= W, W - J < 20, Or(W - J < 10, W - J > 10))), (-oo, True)),
     "hides positions already written (key 0 at position 10) that a sliding window would show"),
    (Piecewise((QK, And(J <= W, W < 40)), (-oo, True)), "hides positions already written (key 40 at position 40)"),
    (Piecewise((QK, And(J <= W, J >= 0, W < 0)), (-oo, True)),
     "the mask hides every written key (key 0 at position 0)"),
    (Piecewise((QK, And(J <= W, W - J < 20)), (-50, J <= W), (-oo, True)),
     "hides positions already written (key 0 at position 20) with a value that is not a hidden key's"),
    (Piecewise((QK, J < W), (-oo, True)), "hides positions already written (key 0 at position 0)"),
    (Piecewise((QK, J <= W + 1), (-oo, True)), "key 1 is after position 0 but not hidden"),
    (Piecewise((QK, J <= 40), (-oo, True)), "key 1 is after position 0 but not hidden"),
    (QK, "key 1 is after position 0 but not hidden"),
    (Piecewise((QK, J <= W), (QK - 100, True)), "not hidden"),
    (Piecewise((QK, 2 * J <= W), (-oo, True)), "not of the form"),
    (Piecewise((QK + J * J, J <= W), (-oo, True)), "not linear in the key index"),
    (Piecewise((QK, J <= W - 60), (QK + W, J <= W), (-oo, True)), "differ between ranges of visible keys"),
], ids=["window-with-sink", "hidden-prefix", "window-with-hole", "hides-all-late", "hides-all", "shallow-window",
        "diagonal",
        "one-ahead", "fixed-length", "no-mask", "shallow-mask", "not-difference",
        "quadratic-bias", "two-biases"])
def test_scores_that_are_not_causal_are_refused_with_a_counterexample(scores, message):
    with pytest.raises(Unproven, match=re.escape(message)):
        decide_causal(scores, 96)


# ------------------------------------------------------------- zoo models at the positions

PROMPT, STEPS, SPAN = 48, 20, 52  # window / rolling slots of 52: positions 53..67 are past them


@pytest.mark.parametrize("name, status, reason", [
    ("sliding_window", "rewritten", "sliding window 52: proved from the mask for every position, "
                                    "row_start = max(0, position - 51)"),
    ("rolling_buffer", "rewritten",
     "rolling buffer of 52 slots written at position % 52: proved for every position, seqlens = min(position + 1, "
     "52), the written slot's page statistics rebuilt each step"),
])
def test_window_and_rolling_buffer_rewritten_stay_exact_past_the_span(name, status, reason):
    """Compiled at position 48, where neither the window nor the wrap hides anything yet: both are
    proved for every position (the window with its row_start, the rolling buffer over min(position
    + 1, 52) slots) and stay exact past the span."""
    entry = ZOO[name]
    reference, model = entry.build(), entry.build()
    prompt = torch.randint(1, 96, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    want_tokens, want_logits = entry.generate(reference, prompt, STEPS)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options=OPTIONS)
    with recording() as report:
        tokens, logits = entry.generate(model, prompt, STEPS, compiled)
    prefill, decode = report.graphs
    assert [s.status for s in decode.sites] == [status] and reason in decode.sites[0].reason, decode.sites
    assert decode.changed == (status == "rewritten")
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)

    # the test covers the failure: the same weights with a plain causal cache agree before the span
    # ends and differ after it, so a rewrite as causal would be wrong on the steps checked above
    causal = gpt_fast.build(dataclasses.replace(reference.args, window=0, rolling=0))
    _, causal_logits = gpt_fast.generate(causal, prompt, STEPS)
    error = (causal_logits - want_logits).abs().amax(dim=(0, 2))
    position = PROMPT + torch.arange(STEPS)
    assert (error[position < SPAN] < 1e-4).all()
    assert int((position > SPAN).sum()) >= 10 and (error[position > SPAN] > 1e-3).all()


def _decode_plan(args: gpt_fast.ModelArgs, *, allow_guards: bool = True, setup=None):
    model = gpt_fast.build(args, batch=1)
    if setup is not None:
        setup(model)
    prompt = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(prompt, torch.arange(8))
    [(gm, inputs)] = capture_graphs(model, prompt[:, -1:], torch.tensor([8]))
    return analyze(gm, inputs, EntmaxKVConfig(), allow_guards=allow_guards)


def _band(model) -> None:
    """Turn gpt-fast's tril mask buffer into a 40-key window: no longer lower triangular."""
    mask = model.layers[0].attention.causal_mask
    mask.copy_(mask & ~torch.tril(torch.ones_like(mask), diagonal=-40))


@pytest.mark.parametrize("args, setup, status, reason", [
    (dict(mask="buffer"), None, "rewritten", "proved lower triangular"),
    (dict(mask="buffer"), _band, "refused", "picks a row of a tensor whose content is not described"),
    (dict(window=500), None, "rewritten", ""),
    (dict(window=500, alibi="all", rope=False, mask="additive"), None, "rewritten", "ALiBi"),
    (dict(mask="none"), None, "refused", "the model attends cache rows not yet written"),
], ids=["tril-buffer", "band-buffer", "wide-window", "wide-window-alibi", "no-mask"])
def test_mask_forms(args, setup, status, reason):
    [site] = _decode_plan(gpt_fast.ModelArgs(n_layer=1, **args), setup=setup).sites
    assert site.status == status and reason in site.reason, site.reason


# ------------------------------------------------------------------------------ run-time guards


def _hf_generate(model, prompt, mask, steps, forward=None):
    from examples.zoo import hf_models

    cache = hf_models.StaticCache(config=model.config, max_cache_len=48)
    config = hf_models.GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                        disable_compile=True, pad_token_id=0, eos_token_id=None,
                                        output_logits=True, return_dict_in_generate=True)
    original = model.forward
    if forward is not None:
        model.forward = forward
    try:
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=mask, past_key_values=cache, generation_config=config)
    finally:
        model.forward = original
    return torch.stack(out.logits, 1)


def test_hf_mask_input_is_guarded_and_a_failed_guard_runs_the_models_attention():
    """The decode graph compiled on an unpadded batch is reused for a left-padded one: the mask
    input then hides a written row, the guard fails and the call runs the model's attention."""
    reference, model = ZOO["hf_llama"].build(), ZOO["hf_llama"].build()
    prompt = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    full = torch.ones_like(prompt)
    padded = full.clone()
    padded[0, :3] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="entmaxkv", options=OPTIONS)
    with recording() as report:
        logits = _hf_generate(model, prompt, full, 4, compiled)
    torch.testing.assert_close(logits, _hf_generate(reference, prompt, full, 4), atol=1e-5, rtol=0)
    decode = [s for s in report.sites if s.phase == "decode"]
    assert [s.status for s in decode] == ["rewritten"] and "checked causal at each call" in decode[0].reason

    with recording() as again, pytest.warns(RuntimeWarning, match="run-time guard failed"):
        logits = _hf_generate(model, prompt, padded, 4, compiled)
    assert not again.graphs  # no recompilation: the guard is what kept the answer right
    torch.testing.assert_close(logits, _hf_generate(reference, prompt, padded, 4), atol=1e-5, rtol=0)


def test_alibi_slopes_modified_after_compilation_fail_over():
    entry = ZOO["alibi_half"]
    reference, model = entry.build(), entry.build()
    prompt = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options=OPTIONS)
    entry.generate(model, prompt, 3, compiled)
    with torch.no_grad():
        for m in (reference, model):
            m.layers[0].attention.slopes.mul_(3.0)
    with pytest.warns(RuntimeWarning, match="slopes_ unchanged"):
        tokens, logits = entry.generate(model, prompt, 6, compiled)
    want_tokens, want_logits = entry.generate(reference, prompt, 6)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)


def test_offline_analysis_refuses_a_mask_it_could_only_check_per_call():
    from entmaxkv_compile.compiler.capture import install_capture

    model = ZOO["hf_llama"].build()
    prompt = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, [x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]))
        return gm.forward

    install_capture()
    torch._dynamo.reset()
    _hf_generate(model, prompt, torch.ones_like(prompt), 2, torch.compile(model.forward, backend=keep))
    gm, inputs = graphs[-1]
    [site] = analyze(gm, inputs, EntmaxKVConfig(), allow_guards=False).sites
    assert site.status == "refused" and "the offline rewrite has no run-time guards" in site.reason
    [site] = analyze(gm, inputs, EntmaxKVConfig(), allow_guards=True).sites
    assert site.status == "rewritten"


@pytest.mark.parametrize("name, reason", [("window_sink", "that a sliding window would show: a hole")])
def test_offline_rewrite_refuses_window_with_a_hole(name, reason):
    from entmaxkv_compile.compiler.rewrite import UnsupportedModelError, rewrite

    model = ZOO[name].build()
    prompt = torch.randint(1, 96, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(prompt, torch.arange(PROMPT))
    with pytest.raises(UnsupportedModelError, match=reason):
        rewrite(model, (prompt[:, -1:], torch.tensor([PROMPT])), EntmaxKVConfig(selector="certified"))


class _BoolMaskInput(torch.nn.Module):
    """A static cache whose boolean mask is an argument of the step (as a serving loop passes it)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.randn(1, 2, 32, 8))
        self.register_buffer("v", torch.randn(1, 2, 32, 8))

    def forward(self, q, k_new, v_new, pos, mask):
        import entmax

        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        scores = (q @ self.k.transpose(-2, -1) * 0.5).masked_fill(~mask, float("-inf"))
        return entmax.entmax15(scores, dim=-1) @ self.v


def test_bool_mask_input_is_checked_at_every_call():
    torch.manual_seed(0)
    eager, model = _BoolMaskInput(), _BoolMaskInput()
    model.load_state_dict(eager.state_dict())
    keys = torch.arange(32).view(1, 1, 1, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options=OPTIONS)
    with recording() as report:
        for pos in range(10, 14):
            args = (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.tensor([pos]))
            mask = keys <= pos
            if pos == 13:  # hide a written row: the guard fails, the model's own attention runs
                mask = mask & (keys != 4)
                with pytest.warns(RuntimeWarning, match="bool mask input"):
                    got = compiled(*args, mask)
            else:
                got = compiled(*args, mask)
            torch.testing.assert_close(got, eager(*args, mask), atol=1e-6, rtol=0)
    [graph] = report.graphs
    assert [s.status for s in graph.sites] == ["rewritten"] and "checked causal at each call" in graph.sites[0].reason


class _InGraphTriangle(torch.nn.Module):
    """The causal mask built inside the step from a triangle of a constant matrix."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("k", torch.randn(1, 2, 32, 8))
        self.register_buffer("v", torch.randn(1, 2, 32, 8))

    def forward(self, q, k_new, v_new, pos):
        import entmax

        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        scores = q @ self.k.transpose(-2, -1) * 0.5
        if self.spelling == "tril":
            scores = scores.masked_fill(~torch.ones(32, 32, dtype=torch.bool).tril()[pos], float("-inf"))
        elif self.spelling == "tril(-1)":  # hides the diagonal: the token just written
            scores = scores.masked_fill(~torch.ones(32, 32, dtype=torch.bool).tril(-1)[pos], float("-inf"))
        else:  # additive: -inf strictly above the diagonal
            scores = scores + torch.triu(torch.full((32, 32), float("-inf")), diagonal=1)[pos]
        return entmax.entmax15(scores, dim=-1) @ self.v


@pytest.mark.parametrize("spelling, status, reason", [
    ("tril", "rewritten", ""), ("triu-additive", "rewritten", ""),
    ("tril(-1)", "refused", "hides positions already written (key 0 at position 0)"),
])
def test_in_graph_triangular_masks(spelling, status, reason):
    args = (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.tensor([9]))
    [(gm, inputs)] = capture_graphs(_InGraphTriangle(spelling), *args)
    [site] = analyze(gm, inputs, EntmaxKVConfig()).sites
    assert site.status == status and reason in site.reason, site.reason
