"""Tensor parallel gpt-fast model on 2 and 4 gloo processes, compiled per rank with the entmaxkv
backend: every rank's sites are found and rewritten, the all-reduces stay in the graph, and the
greedy tokens and certified logits equal the unsharded eager model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distributed_workers as workers
from entmaxkv_compile.distributed import spawn
from entmaxkv_compile.distributed.tensor_parallel import head_range, shard_mlp, shard_qkv_projection
from examples.zoo import gpt_fast

STEPS = 12


@pytest.mark.parametrize("world,compiler", [(2, "inductor"), (4, "eager")])
def test_sharded_compiled_model_decodes_the_unsharded_tokens(world, compiler):
    options = {"selector": "certified", "page_size": 16, "compiler": compiler, "compile_threads": 1}
    results = spawn(workers.tensor_parallel_generate, world, args=(STEPS, options), timeout_s=240)
    want_tokens, want_logits = gpt_fast.generate(gpt_fast.build(workers.tensor_parallel_args(), batch=2),
                                                 workers.tensor_parallel_prompt(), STEPS)
    layers = workers.tensor_parallel_args().n_layer
    for result in results:
        assert result["sites"] == [(f"layers.{i}.attention", "rewritten", "decode") for i in range(layers)]
        assert result["collectives"] == [2 * layers]  # one graph; attention and MLP all-reduce per layer
        assert result["cache_heads"] == workers.tensor_parallel_args().n_kv_head // world
        assert torch.equal(result["tokens"], want_tokens)
        torch.testing.assert_close(result["logits"], want_logits, atol=1e-5, rtol=0)


def test_shards_reassemble_the_projections():
    torch.manual_seed(0)
    q_heads, kv_heads, head_dim, world = 4, 2, 3, 2
    wqkv = nn.Linear(5, (q_heads + 2 * kv_heads) * head_dim)
    x = torch.randn(7, 5)
    full = wqkv(x).split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    parts = [shard_qkv_projection(wqkv, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, rank=r,
                                  world_size=world)(x) for r in range(world)]
    for i, size in enumerate((q_heads, kv_heads, kv_heads)):
        local = size // world * head_dim
        offset = sum(s // world * head_dim for s in (q_heads, kv_heads, kv_heads)[:i])
        torch.testing.assert_close(torch.cat([p[:, offset:offset + local] for p in parts], -1), full[i])
    up, down = nn.Linear(5, 8), nn.Linear(8, 5)
    want = down(torch.relu(up(x)))
    got = sum(d(torch.relu(u(x))) for u, d in (shard_mlp(up, down, r, world) for r in range(world)))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"kv_heads \(2\) must be a multiple of the world size \(4\)"):
        shard_qkv_projection(wqkv, q_heads=4, kv_heads=2, head_dim=3, rank=0, world_size=4)
    assert head_range(8, 3, 4) == (6, 8)
