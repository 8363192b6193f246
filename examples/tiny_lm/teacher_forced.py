"""Teacher-forced evaluation of decode-time attention variants on a long window.

Full autoregressive decoding of 16k tokens per variant would be slow and would mix two effects (the
variant's own error and the drift of a cache it wrote itself). Instead:

1. :func:`prefill` runs the exact model over the whole window once (query-chunked, so a 16k window
   fits in memory) and keeps every layer's K/V: the teacher-forced KV cache.
2. :func:`decode_positions` replays the decode step at chosen positions, one sequence per position
   (``seqlens = position + 1``), through every layer. Each layer's query comes from the variant's
   own residual stream, the K/V from the exact cache, and ``attend`` (the variant) computes the
   attention output. Errors therefore compound through the layers of a step, as in real decoding,
   while the cache stays the exact one.
"""

from __future__ import annotations

from typing import Callable

import torch

from .model import TinyLM

__all__ = ["AttendFn", "prefill", "decode_positions"]

# attend(layer, q [B, Hq, 1, D], k_cache [B, Hkv, N, D], v_cache, seqlens int64 [B]) -> out [B, Hq, 1, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def prefill(
    model: TinyLM, tokens: torch.Tensor, chunk: int = 2048
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Exact causal pass over ``tokens [N]``: logits ``[N, vocab]`` and per-layer ``(k, v)`` ``[1, Hkv, N, D]``.

    Attention is computed ``chunk`` query rows at a time against the keys up to the chunk's end.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor of byte ids, got shape {tuple(tokens.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = tokens.shape[0]
    pos = torch.arange(n, device=tokens.device)
    x = model.embed(tokens[None])
    caches = []
    for block in model.blocks:
        q, k, v = block.qkv(x)
        caches.append((k, v))
        parts = []
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            bias = model.causal_bias(pos[start:stop], pos[:stop])
            parts.append(model.attend(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], bias))
        x = block.finish(x, torch.cat(parts, dim=2))
    return model.logits(x)[0], caches


@torch.no_grad()
def decode_positions(
    model: TinyLM,
    tokens: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    positions: torch.Tensor,
    attend: AttendFn,
) -> torch.Tensor:
    """Logits ``[Q, vocab]`` of decode steps at ``positions [Q]`` with attention done by ``attend``.

    Step ``i`` is a sequence of length ``positions[i] + 1`` whose last token is
    ``tokens[positions[i]]``; the shared exact cache is broadcast over the ``Q`` steps (no copy).
    """
    if positions.dim() != 1 or positions.numel() == 0:
        raise ValueError(f"positions must be a non-empty 1-D tensor, got shape {tuple(positions.shape)}")
    n = caches[0][0].shape[2]
    if int(positions.min()) < 0 or int(positions.max()) >= n:
        raise ValueError(f"positions must lie in [0, {n}), got [{int(positions.min())}, {int(positions.max())}]")
    steps = positions.shape[0]
    seqlens = positions.to(torch.int64) + 1
    x = model.embed(tokens[positions])[:, None, :]
    for layer, (block, (k, v)) in enumerate(zip(model.blocks, caches)):
        q, _, _ = block.qkv(x)
        out = attend(layer, q, k.expand(steps, -1, -1, -1), v.expand(steps, -1, -1, -1), seqlens)
        x = block.finish(x, out.to(x.dtype))
    return model.logits(x)[:, 0]
