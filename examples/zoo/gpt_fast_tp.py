"""The zoo's gpt-fast model, tensor parallel: each rank keeps ``Hq/W`` query heads, ``Hkv/W`` KV
heads (and their cache) and ``1/W`` of every MLP, as gpt-fast's ``tp.py`` does."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.distributed as dist

from entmaxkv_compile.distributed.tensor_parallel import (
    all_reduce_outputs,
    head_range,
    shard_columns,
    shard_mlp,
    shard_qkv_projection,
)

from .gpt_fast import KVCache, Transformer


def shard(model: Transformer, group: Optional[Any] = None) -> Transformer:
    """Shard ``model`` (caches set up, possibly filled) in place for this rank of ``group``;
    returns it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    args = model.args
    if args.dim % world:
        raise ValueError(f"dim ({args.dim}) must be a multiple of the world size ({world})")
    local = dataclasses.replace(args, n_head=args.n_head // world, n_kv_head=args.n_kv_head // world,
                                dim=args.dim // world)  # keeps head_dim = dim / n_head
    q0, q1 = head_range(args.n_head, rank, world, "n_head")
    k0, k1 = head_range(args.n_kv_head, rank, world, "n_kv_head")
    for block in model.layers:
        attention = block.attention
        attention.wqkv = shard_qkv_projection(attention.wqkv, q_heads=args.n_head, kv_heads=args.n_kv_head,
                                              head_dim=args.head_dim, rank=rank, world_size=world)
        attention.wo = shard_columns(attention.wo, q0 * args.head_dim, q1 * args.head_dim, rank)
        attention.args = local
        if args.alibi != "none":
            attention.slopes = attention.slopes[q0:q1]
        cache = attention.kv_cache
        attention.kv_cache = KVCache(cache.k_cache.shape[0], local.n_kv_head, args.max_seq_len, args.head_dim,
                                     cache.k_cache.dtype, cache.write, cache.rolling).to(cache.k_cache.device)
        attention.kv_cache.k_cache.copy_(cache.k_cache[:, k0:k1])  # a filled cache keeps this rank's heads
        attention.kv_cache.v_cache.copy_(cache.v_cache[:, k0:k1])
        all_reduce_outputs(attention, group)
        up, act, down = block.feed_forward
        up, down = shard_mlp(up, down, rank, world)
        block.feed_forward[0], block.feed_forward[2] = up, down
        all_reduce_outputs(block.feed_forward, group)
    return model


__all__ = ["shard"]
