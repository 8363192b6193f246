"""Soft-capped attention (Gemma-2's ``cap * tanh(s / cap)``) through the ``entmaxkv`` backend.

A zoo model that caps its scores before the mask must be rewritten with its cap and decode,
certified, exactly as the uncompiled model; forms that are not a cap the runtime computes are
refused with their reason (and the model's own attention runs).
"""

from __future__ import annotations

import pytest
import torch

from entmaxkv_compile.compiler.explain import recording
from examples.zoo import gpt_fast
from examples.zoo.gpt_fast import ModelArgs

STEPS = 16
OPTIONS = {"compiler": "eager", "selector": "certified", "certify_max_rounds": 1, "page_size": 4}


def _decode(args: ModelArgs, compiled: bool, dtype: torch.dtype = torch.float32):
    """``(tokens, logits, explained decode sites)`` of 16 greedy steps after a 12-token prompt."""
    model = gpt_fast.build(args, dtype=dtype)
    prompt = torch.randint(1, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(11))
    if not compiled:
        return (*gpt_fast.generate(model, prompt, STEPS), None)
    torch._dynamo.reset()
    step = torch.compile(model, backend="entmaxkv", options=OPTIONS)
    with recording() as report:
        tokens, logits = gpt_fast.generate(model, prompt, STEPS, decode=step, prefill=step)
    prefill, decode = report.graphs
    return tokens, logits, decode.sites


@pytest.mark.parametrize("cap, form, weights", [
    (30.0, "div", "entmax15"),   # Gemma-2's cap: cap * tanh(s / cap)
    (5.0, "mul", "sparsemax"),   # a tight cap that changes the output: tanh(s * (1/cap)) * cap
])
def test_soft_capped_model_decodes_exactly_and_is_explained(cap, form, weights):
    args = ModelArgs(n_layer=2, softcap=cap, softcap_form=form, weights=weights)
    want_tokens, want_logits, _ = _decode(args, compiled=False)
    tokens, logits, sites = _decode(args, compiled=True)
    assert [s.status for s in sites] == ["rewritten", "rewritten"], [s.reason for s in sites]
    assert all(f"(logit soft-cap {cap:g})" in s.reason for s in sites)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    if cap == 5.0:  # the cap matters here: the same weights uncapped decode other logits
        _, uncapped, _ = _decode(ModelArgs(n_layer=2, weights=weights), compiled=False)
        assert (uncapped - want_logits).abs().max().item() > 1e-2


def test_bf16_soft_capped_model_gives_the_uncompiled_tokens():
    args = ModelArgs(n_layer=2, softcap=5.0)
    want_tokens, want_logits, _ = _decode(args, compiled=False, dtype=torch.bfloat16)
    tokens, logits, sites = _decode(args, compiled=True, dtype=torch.bfloat16)
    assert [s.status for s in sites] == ["rewritten", "rewritten"], [s.reason for s in sites]
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits.float(), want_logits.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("args, reason", [
    (ModelArgs(n_layer=1, softcap=5.0, softcap_form="after_mask"),
     "an additive mask or bias inside the tanh (masked scores would become -cap, not -inf)"),
    (ModelArgs(n_layer=1, softcap=5.0, softcap_form="buffer"),
     "soft-capped scores: the cap's factor outside tanh (l_self_modules_layers_modules_0_modules_attention_"
     "buffers_cap_) is not a graph constant"),
    (ModelArgs(n_layer=1, softcap=5.0, alibi="all", rope=False),
     "an ALiBi bias added after the soft-cap"),
], ids=["mask-inside-the-cap", "cap-not-a-constant", "alibi-after-the-cap"])
def test_caps_the_runtime_cannot_compute_are_refused_and_stay_exact(args, reason):
    want_tokens, want_logits, _ = _decode(args, compiled=False)
    tokens, logits, sites = _decode(args, compiled=True)
    assert [s.status for s in sites] == ["refused"] and reason in sites[0].reason, [s.reason for s in sites]
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
