"""Tensor parallel helpers, gpt-fast style: shard attention (and MLP) weights by heads and add the
partial outputs with one all-reduce through ``torch.distributed._functional_collectives``.

Rank ``r`` of ``W`` keeps query heads ``[r*Hq/W, (r+1)*Hq/W)`` and KV heads
``[r*Hkv/W, (r+1)*Hkv/W)`` (so a GQA group never straddles two ranks), the matching rows of the
fused q/k/v projection and columns of the output projection; its KV cache holds only its KV heads.
The output projection's partial sums are added by a forward hook calling the functional
``all_reduce``, which Dynamo traces into the graph as ``_c10d_functional.all_reduce`` +
``wait_tensor``: the ``entmaxkv`` backend then sees, on every rank, an ordinary attention over
``Hq/W`` heads with a static cache of ``Hkv/W`` heads, finds and rewrites it as on one device, and
leaves the collective where it is. Exactness carries over: each rank's attention heads are
computed exactly as unsharded, only the projection sums are added in another order.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

__all__ = ["all_reduce_outputs", "head_range", "shard_columns", "shard_mlp", "shard_qkv_projection"]


def head_range(num_heads: int, rank: int, world_size: int, name: str = "num_heads") -> tuple[int, int]:
    """``(first, stop)`` of the heads rank ``rank`` owns; ``num_heads`` must divide by the world."""
    if num_heads % world_size:
        raise ValueError(f"{name} ({num_heads}) must be a multiple of the world size ({world_size})")
    per = num_heads // world_size
    return rank * per, (rank + 1) * per


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def shard_qkv_projection(wqkv: nn.Linear, *, q_heads: int, kv_heads: int, head_dim: int, rank: int,
                         world_size: int) -> nn.Linear:
    """The rows of a fused ``[q; k; v]`` projection (``(Hq + 2*Hkv) * D`` outputs) that produce
    this rank's query and KV heads, in the same fused order."""
    q0, q1 = head_range(q_heads, rank, world_size, "q_heads")
    k0, k1 = head_range(kv_heads, rank, world_size, "kv_heads")
    offsets = (0, q_heads * head_dim, (q_heads + kv_heads) * head_dim)
    rows = torch.cat([torch.arange(base + a * head_dim, base + b * head_dim)
                      for base, (a, b) in zip(offsets, ((q0, q1), (k0, k1), (k0, k1)))])
    bias = None if wqkv.bias is None else wqkv.bias.detach()[rows]
    return _linear(wqkv.weight.detach()[rows], bias)


def shard_columns(layer: nn.Linear, first: int, stop: int, rank: int) -> nn.Linear:
    """The input columns ``[first, stop)`` of ``layer`` (a row-parallel projection whose partial
    outputs are summed over ranks): the bias is kept on rank 0 only, so it is added once."""
    bias = None if layer.bias is None else (layer.bias.detach() if rank == 0 else torch.zeros_like(layer.bias))
    return _linear(layer.weight.detach()[:, first:stop], bias)


def shard_mlp(up: nn.Linear, down: nn.Linear, rank: int, world_size: int) -> tuple[nn.Linear, nn.Linear]:
    """Megatron's MLP split: ``up`` by output rows (column parallel), ``down`` by input columns
    (row parallel); the elementwise activation between them needs no communication."""
    first, stop = head_range(up.out_features, rank, world_size, "the hidden size")
    bias = None if up.bias is None else up.bias.detach()[first:stop]
    return _linear(up.weight.detach()[first:stop], bias), shard_columns(down, first, stop, rank)


def all_reduce_outputs(module: nn.Module, group: Optional[Any] = None) -> Any:
    """Make ``module``'s output the SUM over the ranks of ``group`` (default: the world), through
    the functional all-reduce (traceable by Dynamo). Returns the hook handle."""
    group = dist.group.WORLD if group is None else group

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(output, "sum", group)

    return module.register_forward_hook(hook)
