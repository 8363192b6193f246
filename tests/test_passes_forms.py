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
