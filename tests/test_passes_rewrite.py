"""The decode rewrite: graph shape, statistics state, bookkeeping, exactness of one step."""

from __future__ import annotations

import gc

import pytest
import sympy
import torch
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from entmaxkv_compile.compiler.backend import copy_graph_module, extra_inputs_for, prewarm
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.compiler.explain import recording
from entmaxkv_compile.compiler.passes import REWRITTEN, StatsRegistry, analyze, rewrite
from entmaxkv_compile.compiler.passes.ir import op_of, proves_equal
from entmaxkv_compile.compiler.passes.static_state import STATS
from examples.zoo import gpt_fast
from examples.zoo.tracing import capture_graphs


def _model(batch=2, **args):
    return gpt_fast.build(gpt_fast.ModelArgs(n_layer=2, **args), batch=batch, seed=3)


def _prompt(batch, length, seed=0):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("args", [dict(), dict(n_head=8, n_kv_head=2, gqa="expand", alibi="half", rope=False)])
def test_rewritten_decode_graph_reads_no_expanded_cache(args):
    model = _model(**args)
    prompt = _prompt(2, 13)
    with torch.no_grad():
        model(prompt, torch.arange(13))
    [(gm, inputs)] = capture_graphs(model, prompt[:, -1:], torch.tensor([13]))
    gm = copy_graph_module(gm)
    config = EntmaxKVConfig(page_size=4)
    plan = analyze(gm, inputs, config)
    assert [s.status for s in plan.sites] == [REWRITTEN, REWRITTEN]
    result = rewrite(gm, plan, config)
    targets = _targets(gm)
    assert targets.count("entmaxkv.page_stats_append.default") == 2
    assert targets.count("entmaxkv.decode_step.default") == 2
    assert not any(op_of(n) in ("entmax", "matmul", "einsum", "repeat_interleave", "expand") for n in gm.graph.nodes
                   if n.op != "placeholder" and _reads_cache(n, gm)), gm.code
    assert len(result.extra_inputs) == 8 + (2 if model.args.alibi != "none" else 0)
    assert [c.cache_index for c in result.catch_ups] == sorted({e.cache_index for e in result.extra_inputs
                                                                if e.kind == "stats"})
    assert len(result.decode_calls) == 2
    extra = extra_inputs_for(result, inputs)
    prewarm(result, inputs, extra)  # the CUDA warm-up call must be well-formed (runs anywhere)


def _reads_cache(node, gm):
    caches = {n for n in gm.graph.nodes if n.op == "placeholder" and "cache" in n.name and "entmaxkv" not in n.name}
    return any(parent in caches for parent in node.all_input_nodes)


def test_stats_registry_follows_the_cache_tensor():
    registry = StatsRegistry()
    cache = torch.zeros(2, 3, 40, 8)
    stats, created = registry.get(cache, 16)
    assert created and stats.kmin.shape == (2, 3, 3, 8) and stats.kmean.dtype == torch.float32
    again, created = registry.get(cache, 16)
    assert again is stats and not created
    assert registry.get(cache, 8)[0] is not stats
    other, created = registry.get(torch.zeros(2, 3, 40, 8), 16)
    assert created and other is not stats
    assert registry.lookup(torch.zeros(1, 1, 16, 8), 16) is None
    ref = cache
    del cache, ref
    gc.collect()
    assert len(registry._stats) <= 1  # the dropped cache took its statistics with it


@pytest.mark.parametrize("prefill_compiled", [True, False], ids=["compiled-prefill", "eager-prefill-catch-up"])
def test_statistics_match_a_fresh_prefill_after_decode_steps(prefill_compiled):
    model = _model(batch=3, n_kv_head=4)
    prompt = _prompt(3, 21, seed=1)
    compiled = torch.compile(model, backend="entmaxkv", options={"compiler": "eager", "page_size": 8,
                                                                 "selector": "certified"})
    prefill = compiled if prefill_compiled else model
    torch._dynamo.reset()
    tokens, _ = gpt_fast.generate(model, prompt, 6, decode=compiled, prefill=prefill)
    length = 21 + 6  # the last sampled token is not written
    for layer in model.layers:
        cache = layer.attention.kv_cache.k_cache
        stats = STATS.lookup(cache, 8)
        assert stats is not None
        fresh = KVPageStats.from_cache(cache, torch.full((3,), length), 8)
        valid_pages = -(-length // 8)
        for got, want in zip(stats.buffers(), fresh.buffers()):
            torch.testing.assert_close(got[:, :, :valid_pages], want[:, :, :valid_pages], atol=1e-5, rtol=1e-5)


def test_softmax_graph_is_handed_on_unchanged():
    model = _model(weights="softmax")
    prompt = _prompt(2, 9)
    compiled = torch.compile(model, backend="entmaxkv", options={"compiler": "eager"})
    torch._dynamo.reset()
    with recording() as report:
        gpt_fast.generate(model, prompt, 2, decode=compiled, prefill=compiled)
    assert len(report.graphs) == 2
    assert all(not g.changed for g in report.graphs)
    assert {s.status for s in report.sites} == {"not-entmax"}


def test_query_length_proof_uses_sympy_for_symbolic_sizes():
    env = ShapeEnv()
    s0 = env.create_unbacked_symint()
    assert proves_equal(1, 1) and not proves_equal(3, 1)
    assert not proves_equal(s0, 1)
    assert proves_equal(s0 - s0 + 1, 1)
    assert sympy.Integer(1) == 1


@pytest.mark.parametrize("dtype,moments", [(torch.float16, "float32"), (torch.bfloat16, "cache")])
def test_half_precision_decode_is_rewritten_and_close(dtype, moments):
    args = gpt_fast.ModelArgs(n_layer=1, n_head=4, n_kv_head=2)
    reference = gpt_fast.build(args, batch=2, dtype=dtype, seed=4)
    model = gpt_fast.build(args, batch=2, dtype=dtype, seed=4)
    prompt = _prompt(2, 19, seed=2)
    _, want = gpt_fast.generate(reference, prompt, 1)
    compiled = torch.compile(model, backend="entmaxkv", options={"compiler": "eager", "selector": "certified",
                                                                 "moment_dtype": moments})
    torch._dynamo.reset()
    with recording() as report:
        _, got = gpt_fast.generate(model, prompt, 1, decode=compiled, prefill=compiled)
    assert [s.status for s in report.sites] == ["bookkeeping", "rewritten"]
    stats = STATS.lookup(model.layers[0].attention.kv_cache.k_cache, 16, moments)
    assert stats.kmin.dtype == dtype and stats.kmean.dtype == (dtype if moments == "cache" else torch.float32)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
