"""Every zoo model through the backend: 64 greedy steps, exact in certified mode, explain asserted."""

from __future__ import annotations

import math

import pytest
import torch

from entmaxkv_compile.compiler.explain import recording
from examples.zoo import ZOO

STEPS = 64
PROMPT_LEN = 12


def _prompt(batch: int = 2) -> torch.Tensor:
    return torch.randint(1, 96, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(11))


def _run(entry, options, steps=STEPS):
    reference, model = entry.build(), entry.build()
    prompt = _prompt(entry.batch)
    want = entry.generate(reference, prompt, steps)
    torch._dynamo.reset()
    compiled = torch.compile(entry.compile_target(model), backend="entmaxkv", options={"compiler": "eager", **options})
    with recording() as report:
        got = entry.generate(model, prompt, steps, compiled)
    return want, got, report


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_certified_decode_is_exact_and_explained(name):
    entry = ZOO[name]
    (want_tokens, want_logits), (tokens, logits), report = _run(
        entry, {"selector": "certified", "certify_max_rounds": 1})
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)

    if entry.prefill_status is None:  # the prefill ran uncompiled: the decode graph only
        [decode] = report.graphs
        checked = [(decode, entry.decode_status)]
    else:
        prefill, decode = report.graphs  # one prefill graph, one decode graph (no recompilation per step)
        checked = [(prefill, entry.prefill_status), (decode, entry.decode_status)]
    for graph, status in checked:
        assert len(graph.sites) == entry.layers
        for layer, site in enumerate(graph.sites):
            assert site.where.endswith(f"layers.{layer}.attention") or site.where.endswith(f"layers.{layer}.self_attn")
            assert site.kind == entry.kind
            assert site.status == status, site.reason
            if entry.alpha is None:
                assert site.alpha is None
            else:
                assert site.alpha == pytest.approx(entry.alpha)
    assert decode.changed == (entry.decode_status == "rewritten")
    if entry.kind == "softmax":
        assert not any(graph.changed for graph, _ in checked)


@pytest.mark.parametrize("name", ["gpt_fast_entmax15", "alibi_half"])
def test_approximate_selectors_report_their_error(name, capsys):
    """gaussian and topk are approximate: report the logit error (documented in docs/backend.md).

    Pages of 4 tokens, so the 28-token contexts span 7 pages and selection matters.
    """
    entry = ZOO[name]
    errors = {}
    for selector, extra in (("gaussian", {}), ("topk", {"token_budget": 8}), ("topk", {"token_budget": 4096})):
        options = {"selector": selector, "page_size": 4, **extra}
        (want_tokens, want_logits), (tokens, logits), _ = _run(entry, options, steps=16)
        err = (logits - want_logits).abs().max().item()
        errors[f"{selector}:{extra.get('token_budget', '')}"] = err
        assert math.isfinite(err)
    assert errors["topk:4096"] < 1e-5  # a budget covering the whole cache selects every page
    with capsys.disabled():
        print(f"\n{name}: max |logit error| over 16 steps: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))


def test_left_padded_hf_batch_is_rewritten_with_row_start_and_exact():
    """A padding mask hides a per-row prefix of the cache: the site is rewritten with decode_step's
    row_start (read from the mask) and 16 certified greedy steps give the uncompiled model's tokens."""
    from examples.zoo import hf_models

    prompt = _prompt()
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # the first sequence is left-padded
    config = hf_models.GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=False, disable_compile=True,
                                        pad_token_id=0, eos_token_id=None)

    def generate(model):
        cache = hf_models.StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            return model.generate(prompt, attention_mask=mask, cache=cache, generation_config=config)

    want = generate(ZOO["hf_llama"].build())
    model = ZOO["hf_llama"].build()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="entmaxkv",
                                  options={"compiler": "eager", "selector": "certified", "page_size": 4})
    with recording() as report:
        got = generate(model)
    assert torch.equal(got, want)
    decode = [s for s in report.sites if s.phase == "decode"]
    assert decode and all(s.status == "rewritten" for s in decode), [s.reason for s in decode]
    assert "left padding: row_start" in decode[0].reason


def test_low_precision_model_on_large_scores_is_rewritten_at_every_layer():
    """bf16 scores round coarsely when keys align with the query (planted spans): the model's own
    output then differs from float64 attention by ~0.1, which must not refuse the rewrite (the
    check compares with exact entmax of the model's own scores)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import e2e
    from entmaxkv_compile.compiler.explain import explain

    plan = dict(e2e.PRESETS["quick"], device="cpu", layers=3)  # MHA 8 x 128, bf16
    context = 4096  # layer 2's planted spans gave a 0.087 model error here
    model = e2e.build(plan, context, "own_entmax15", e2e.planted_fill(plan, context, 0))
    token = torch.zeros(1, 1, dtype=torch.long)
    torch._dynamo.reset()  # earlier tests' compilations of the same forward must not hit the recompile limit
    report = explain(model, token, torch.tensor([context]), options=dict(selector="certified", page_size=16))
    assert [s.status for s in report.sites] == ["rewritten"] * 3, str(report)
