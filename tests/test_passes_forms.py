"""Attention forms of real models: MQA/GQA by broadcasting, fused K/V buffers, per-head alpha."""

from __future__ import annotations

import pytest
import torch

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.compiler.passes import REFUSED, REWRITTEN, analyze
from examples.zoo import gpt_fast
from examples.zoo.tracing import capture_graphs

CONFIG = EntmaxKVConfig()


def _decode_plan(prompt_len=9, batch=2, **args):
    """Prefill eagerly, then analyze the Dynamo graph of one decode step of a 1-layer zoo model."""
    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, **args), batch=batch)
    prompt = torch.randint(0, model.args.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(prompt, torch.arange(prompt_len))
    [(gm, inputs)] = capture_graphs(model, prompt[:, -1:], torch.tensor([prompt_len]))
    return analyze(gm, inputs, CONFIG), gm, model


BROADCAST_GQA = [
    dict(n_head=4, n_kv_head=1, gqa="expand_flat"),  # k.expand(B, Hq, N, D)
    dict(n_head=6, n_kv_head=2, gqa="expand_flat"),  # k.unsqueeze(2).expand(-1, -1, G, -1, -1).flatten(1, 2)
    dict(n_head=4, n_kv_head=1, gqa="broadcast"),  # q [B, Hq, 1, D] @ k [B, 1, D, N]: the matmul broadcasts
    dict(n_head=4, n_kv_head=1, gqa="broadcast", scores="einsum"),
]


@pytest.mark.parametrize("spelling", BROADCAST_GQA, ids=[f"{s['gqa']}-{s['n_head']}:{s['n_kv_head']}"
                                                         + ("-einsum" if "scores" in s else "") for s in BROADCAST_GQA])
def test_gqa_written_by_broadcasting_is_rewritten(spelling):
    plan, _, model = _decode_plan(**spelling)
    [site] = plan.sites
    assert site.status == REWRITTEN, site.reason
    [action] = plan.actions
    assert action.match.k.cache is not None and action.match.v.cache is not None
    if spelling["gqa"] == "expand_flat":  # the head map is derived from the expand's shapes
        assert action.match.k.group == model.args.n_head // model.args.n_kv_head


def test_tiled_expand_is_not_taken_for_the_gqa_head_map():
    """``k[:, None].expand(B, G, Hkv, N, D)`` gives query head h the KV head h % Hkv: refused."""
    plan, _, _ = _decode_plan(n_head=4, n_kv_head=2, gqa="tiled")
    [site] = plan.sites
    assert site.status == REFUSED
    assert "not proved to be the GQA map" in site.reason


@pytest.mark.parametrize("kv_write", ["index_copy", "setitem"])
def test_fused_kv_buffer_is_rewritten_with_k_and_v_as_its_two_parts(kv_write):
    plan, gm, _ = _decode_plan(kv_fused=True, kv_write=kv_write)
    [site] = plan.sites
    assert site.status == REWRITTEN, site.reason
    [action] = plan.actions
    k, v = action.match.k, action.match.v
    assert k.cache is v.cache and (k.part, v.part) == (0, 1)
    assert k.cache.op == "placeholder" and k.shape() == tuple(k.cache.meta["example_value"].shape[1:])


class _OnePartForBoth(torch.nn.Module):
    """K and V both read from ``kv[0]``: the same memory, not a fused K/V buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kv", torch.randn(2, 1, 2, 32, 8))

    def forward(self, q, k_new, pos):
        import entmax

        self.kv[0].index_copy_(2, pos, k_new)
        j = torch.arange(32)
        scores = (q @ self.kv[0].transpose(-2, -1) * 0.3).masked_fill(j > pos, float("-inf"))
        return entmax.entmax15(scores, dim=-1) @ self.kv[0]


def test_k_and_v_read_from_one_part_are_refused():
    args = (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.tensor([9]))
    [(gm, inputs)] = capture_graphs(_OnePartForBoth(), *args)
    [site] = analyze(gm, inputs, CONFIG).sites
    assert site.status == REFUSED and "read from the same buffer" in site.reason


def test_fused_parts_are_disjoint_only_when_the_buffer_has_no_internal_overlap():
    from entmaxkv_compile.compiler.passes.verify import has_no_internal_overlap

    contiguous = torch.zeros(2, 1, 2, 16, 4)
    interleaved = torch.zeros(1, 2, 16, 2, 4).permute(3, 0, 1, 2, 4)  # K and V of a row side by side
    shared = torch.zeros(1, 2, 16, 4).expand(2, 1, 2, 16, 4)  # kv[0] and kv[1] are one tensor
    assert has_no_internal_overlap(contiguous) and has_no_internal_overlap(interleaved)
    assert not has_no_internal_overlap(shared)
    assert not has_no_internal_overlap(torch.zeros(4, 8).as_strided((2, 4, 4), (2, 4, 1)))


def test_fused_statistics_are_keyed_on_the_buffer_and_part_and_follow_the_cache():
    """A view ``kv[0]`` is a new Python object at every call: the statistics must not be."""
    from entmaxkv_compile.compiler.passes import STATS
    from entmaxkv_compile.runtime.stats.reference import KVPageStats

    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, kv_fused=True, kv_write="index_copy"), batch=2)
    prompt = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options={"compiler": "eager", "page_size": 4,
                                                                 "selector": "certified"})
    kv = model.layers[0].attention.kv_cache.kv
    seen = []
    with torch.no_grad():
        compiled(prompt, torch.arange(13))
        for step in range(5):
            compiled(prompt[:, step:step + 1], torch.tensor([13 + step]))
            seen.append(STATS.lookup(kv, 4, part=0))
    assert seen[0] is not None and all(s is seen[0] for s in seen)
    assert STATS.lookup(kv, 4, part=1) is None and STATS.lookup(kv, 4) is None  # K's statistics only
    assert STATS.lookup(kv[0], 4) is None
    fresh = KVPageStats.from_cache(kv[0], torch.full((2,), 18), 4)
    for got, want in zip(seen[0].buffers(), fresh.buffers()):
        torch.testing.assert_close(got[:, :, :5], want[:, :, :5], atol=1e-5, rtol=1e-5)


def test_per_head_alpha_is_reported_and_refused_unless_one_constant():
    plan, _, _ = _decode_plan(head_alphas=(1.5, 1.25, 2.0, 1.5))
    [site] = plan.sites
    assert (site.kind, site.alpha, site.status) == ("entmax", None, REFUSED)
    assert site.reason.startswith("per-head alpha: decode_step takes one alpha") and "1.25" in site.reason
    plan, _, _ = _decode_plan(head_alphas=(1.25,) * 4)
    [site] = plan.sites
    assert (site.kind, site.status) == ("entmax", REWRITTEN), site.reason
    assert site.alpha == pytest.approx(1.25)
    [action] = plan.actions
    assert any("alpha" in g.description for g in action.guards)  # a learned alpha may change: guarded


class _ComputedAlpha(torch.nn.Module):
    """alpha = 1 + softplus(w): computed in the graph, not provably one constant."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.register_buffer("k", torch.randn(1, 2, 16, 8))
        self.register_buffer("v", torch.randn(1, 2, 16, 8))

    def forward(self, q, k_new, v_new, pos):
        import entmax

        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        alpha = 1 + torch.nn.functional.softplus(self.w).view(1, 2, 1, 1)
        scores = (q @ self.k.transpose(-2, -1) * 0.3).masked_fill(torch.arange(16) > pos, float("-inf"))
        return entmax.entmax_bisect(scores, alpha=alpha, dim=-1) @ self.v


def test_alpha_computed_in_the_graph_is_refused_with_reason():
    args = (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.tensor([5]))
    [(gm, inputs)] = capture_graphs(_ComputedAlpha(), *args)
    [site] = analyze(gm, inputs, CONFIG).sites
    assert (site.kind, site.status) == ("entmax", REFUSED)
    assert "computed in the graph" in site.reason


def test_alpha_marker_runs_and_differentiates_like_the_package():
    import entmax

    from entmaxkv_compile.compiler import markers  # noqa: F401 - defines the op

    x = torch.randn(2, 3, 2, 7, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([1.5, 1.3, 2.0], dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 2, 7, dtype=torch.float64)
    want = entmax.entmax_bisect(x, alpha.view(1, 3, 1, 1), -1, 50, True)
    want_grads = torch.autograd.grad((want * grad).sum(), (x, alpha))
    got = torch.ops.entmaxkv.entmax_alpha(x, alpha.view(1, 3, 1, 1), -1, 50, True)
    got_grads = torch.autograd.grad((got * grad).sum(), (x, alpha))
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_a_shared_alpha_changed_after_compiling_runs_the_models_attention():
    """The guard: a learned alpha updated in place (now per head) must not keep the rewrite."""
    args = gpt_fast.ModelArgs(n_layer=1, head_alphas=(1.5,) * 4)
    reference, model = gpt_fast.build(args), gpt_fast.build(args)
    prompt = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options={"compiler": "eager", "selector": "certified"})
    want = gpt_fast.generate(reference, prompt, 3)
    got = gpt_fast.generate(model, prompt, 3, decode=compiled, prefill=compiled)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    with torch.no_grad():
        for m in (reference, model):
            m.layers[0].attention.weights.alpha.copy_(torch.tensor([1.5, 2.0, 1.25, 1.5]))
    with pytest.warns(RuntimeWarning, match="alpha input"):
        got = gpt_fast.generate(model, prompt, 3, decode=compiled, prefill=compiled)
    want = gpt_fast.generate(reference, prompt, 3)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
