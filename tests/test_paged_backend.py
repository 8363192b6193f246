"""The backend on a paged KV cache (a page pool addressed by a block table, ``examples/zoo/paged.py``).

The zoo runs every paged entry for 64 certified steps at the default page size (one 16-token
block per page, prompts of 12 tokens). Here: the zoo model itself against the contiguous model,
small blocks (4 tokens: many pages, prompts of 10 tokens that end inside a page) in fp32 and
bf16, the shared-position slot form, and the refusals with the rule each one breaks.
"""

from __future__ import annotations

import pytest
import torch

from entmaxkv_compile.compiler.explain import explain, recording
from examples.zoo import ZOO, gpt_fast, paged

STEPS = 16
CERTIFIED = {"compiler": "eager", "selector": "certified", "certify_max_rounds": 1}


def _prompt(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(3))


def test_zoo_paged_model_equals_the_contiguous_model_through_a_shuffled_table():
    """The paged model is gpt-fast's model with another cache layout: same weights, same logits."""
    args = paged.PagedArgs(n_layer=2, page_size=4)
    table = paged.shuffled_table(2, args)
    assert not torch.equal(table.flatten().sort().values, table.flatten())  # not the identity
    model = paged.build(args)
    contiguous = gpt_fast.build(gpt_fast.ModelArgs(n_layer=2))
    contiguous.load_state_dict(model.state_dict())
    prompt = _prompt(2, 10)
    tokens, logits = paged.generate(model, prompt, STEPS)
    want_tokens, want_logits = gpt_fast.generate(contiguous, prompt, STEPS)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=0)


FORMS = [{}, {"positions": "per_row"}, {"write": "slice", "gqa": "expand"}]


def _run(model, prompt, compiled: bool):
    """``(tokens, logits, decode sites)`` of 16 greedy steps of a paged or a contiguous zoo model."""
    step = None
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(model, backend="entmaxkv", options={**CERTIFIED, "page_size": 4})
    with recording() as report:
        if isinstance(model, paged.PagedTransformer):
            tokens, logits = paged.generate(model, prompt, STEPS, step)
        elif model.args.positions == "per_row":
            lengths = gpt_fast.ragged_lengths(*prompt.shape)
            tokens, logits = gpt_fast.generate_ragged(model, prompt, lengths, STEPS, decode=step)
        else:
            tokens, logits = gpt_fast.generate(model, prompt, STEPS, decode=step, prefill=step)
    return tokens, logits, [site for site in report.sites if site.phase == "decode"]


def _models(form: dict, dtype: torch.dtype, batch: int):
    args = paged.PagedArgs(n_layer=1, page_size=4, max_seq_len=32, **form)
    return paged.build(args, batch, dtype), paged.build(args, batch, dtype)


@pytest.mark.parametrize("form, dtype", [
    (FORMS[0], torch.float32), (FORMS[1], torch.float32), (FORMS[2], torch.float32),
    (FORMS[0], torch.bfloat16), (FORMS[2], torch.bfloat16),
], ids=["shared-fp32", "ragged-fp32", "slice-slot-fp32", "shared-bf16", "slice-slot-bf16"])
def test_small_blocks_certified_decode_equals_the_model(form, dtype):
    """Blocks of 4 tokens, a 10-token prompt (not a multiple of 4), a shuffled table: 16 certified
    greedy steps give the uncompiled model's tokens (and its logits within 1e-5 in fp32).

    Not the ragged batch in bf16: at its step 3, row 2's two best bf16 logits are one ulp apart
    and the rewrite (scores in fp32) picks the other token, the contiguous rewrite too; the test
    below shows the paged rewrite of that case equal, bit for bit, to the contiguous one."""
    batch = 3 if form.get("positions") == "per_row" else 2
    reference, model = _models(form, dtype, batch)
    prompt = _prompt(batch, 10)
    want_tokens, want_logits, _ = _run(reference, prompt, compiled=False)
    tokens, logits, decode = _run(model, prompt, compiled=True)
    assert torch.equal(tokens, want_tokens)
    if dtype == torch.float32:
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    assert decode and all(site.status == "rewritten" for site in decode), [site.reason for site in decode]
    assert all("decode_step(block_table=l_block_table_)" in site.reason for site in decode)
    assert all("paged_stats_append" in site.reason for site in decode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS[:2], ids=["shared", "ragged"])
def test_paged_rewrite_decodes_bit_for_bit_as_the_contiguous_rewrite(form, dtype):
    """The same weights with a contiguous cache and with a shuffled block table: the two rewritten
    models give the same tokens and the same logits, bit for bit (the table adds no error)."""
    batch = 3 if form.get("positions") == "per_row" else 2
    model, _ = _models(form, dtype, batch)
    contiguous = gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, max_seq_len=32, **form), batch, dtype)
    contiguous.load_state_dict(model.state_dict())
    prompt = _prompt(batch, 10)
    tokens, logits, decode = _run(model, prompt, compiled=True)
    want_tokens, want_logits, want_decode = _run(contiguous, prompt, compiled=True)
    assert [s.status for s in decode] == [s.status for s in want_decode] == ["rewritten"]
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(logits, want_logits)


def _decode_report(name: str, **options):
    entry = ZOO[name]
    model = entry.build()
    table = paged.shuffled_table(entry.batch, model.args)
    args = (table,) if model.args.table == "input" else ()
    model(_prompt(entry.batch, 12), torch.arange(12), *args)
    torch._dynamo.reset()
    return explain(model, _prompt(entry.batch, 1), torch.tensor([12]), *args, options=options)


@pytest.mark.parametrize("name, rule", [
    ("paged_reversed", "the block table indexing the pool is computed inside the graph (reached flip)"),
    ("paged_arange_table", "the block table indexing the pool is computed inside the graph"),
    ("paged_write_ignores_table", "not block_table[b, pos // 16] * 16 + pos % 16: the write index is not proved"),
])
def test_paged_forms_not_proved_are_refused_with_their_rule(name, rule):
    report = _decode_report(name)
    assert [site.status for site in report.sites] == ["refused"], str(report)
    assert report.sites[0].reason.startswith("paged KV cache: ")
    assert rule in report.sites[0].reason
    assert not report.graphs[0].changed


def test_block_size_other_than_the_page_size_is_refused_with_the_fix():
    report = _decode_report("paged_table", page_size=8)
    assert [site.status for site in report.sites] == ["refused", "refused"], str(report)
    assert "block size (16) differs from the configured page_size (8)" in report.sites[0].reason
    assert "set page_size=16" in report.sites[0].reason


def test_prewarm_calls_decode_step_through_the_block_table():
    """The backend runs each inserted decode_step once before Inductor (on GPUs); a paged call
    must pass the graph's table, or decode_step would take the pool for a contiguous cache."""
    from entmaxkv_compile.compiler import backend
    from entmaxkv_compile.compiler.passes import analyze, rewrite
    from entmaxkv_compile.config import EntmaxKVConfig
    from examples.zoo.tracing import capture_graphs

    entry = ZOO["paged_table"]
    model = entry.build()
    table = paged.shuffled_table(entry.batch, model.args)
    model(_prompt(entry.batch, 12), torch.arange(12), table)
    [(gm, inputs)] = capture_graphs(model, _prompt(entry.batch, 1), torch.tensor([12]), table)
    config = EntmaxKVConfig(selector="certified")
    plan = analyze(gm, inputs, config, allow_guards=True)
    result = rewrite(gm, plan, config, track_order=True)
    assert len(result.decode_calls) == 2
    assert all(torch.equal(inputs[call.table_index], table) for call in result.decode_calls)
    backend.prewarm(result, inputs, backend.extra_inputs_for(result, inputs))


def test_offline_rewrite_refuses_a_paged_cache_and_says_where_to_go():
    """The offline rewrite prefills contiguous statistics only: a paged site is refused by name."""
    from entmaxkv_compile.compiler.rewrite import UnsupportedModelError, rewrite

    entry = ZOO["paged_table"]
    model = entry.build()
    table = paged.shuffled_table(entry.batch, model.args)
    model(_prompt(entry.batch, 12), torch.arange(12), table)
    with pytest.raises(UnsupportedModelError, match="this front door does not take block tables; use the "
                                                    "torch.compile backend"):
        rewrite(model, (_prompt(entry.batch, 1), torch.tensor([12]), table))
