"""The ``real`` data family: q, K, V recorded from the trained entmax twin of ``examples/tiny_lm``.

How the cache is made:

1. The committed entmax15 model (6 layers, 6 query heads over 2 KV heads, head dim 64, trained on
   Python standard-library source; see benchmarks/QUALITY.md) runs teacher-forced, exactly, over
   the first ``L = min(16384, N)`` bytes of a held-out file (16384 is the longest context the
   model was evaluated at). Every layer's K and V ``[Hkv=2, L, 64]`` and the queries of the last
   few positions are kept: 12 recorded KV heads.
2. Only the NoPE query heads (odd heads: no ALiBi bias, attention purely content-based) are used,
   so SDPA and our decode, which add no positional bias, compute what the model computed. KV head
   0 of a layer serves one NoPE query head, KV head 1 two. Target KV head ``j`` of sequence ``b``
   takes recorded head ``(j + b * Hkv) mod 12``; its ``G = Hq / Hkv`` query heads cycle through
   that head's NoPE queries, taking positions ``L - 1``, ``L - 2``, ... when G exceeds them (a
   query from position ``L - 1 - i`` then also sees the ``i`` keys after it).
3. Head dim 64 -> D: q and K are zero-padded to D and q is multiplied by ``sqrt(D / 64)``, so
   ``q . k / sqrt(D)`` equals the model's ``q . k / sqrt(64)`` exactly: the scores, hence the
   entmax weights, are the model's. V is zero-padded (the output's extra coordinates are 0). The
   bytes moved are those of a real D = 128 cache; the padding makes the page statistics' extra
   coordinates exactly zero.
4. Extension to N tokens: the last ``L`` rows are the recorded ones, unchanged; the earlier rows
   repeat the recording (row ``t`` copies recorded row ``(t - N + L) mod L``) plus fresh Gaussian
   noise of 0.1x each coordinate's standard deviation (no positional encoding is involved).

How far this is from a real long-context model: the model is tiny and was never trained past 16k
tokens; beyond L the "context" is noisy copies of the same 16k bytes, so every relevant token of
the recorded window recurs N / L times (the support grows with N in proportion, spread periodically
over the cache) instead of the context holding new information. Score statistics (norms, spread,
outliers, page-level similarity) are real; long-range structure beyond L is not.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["REAL_CONTEXT", "record", "real"]

REAL_CONTEXT = 16384  # the longest context the tiny model was evaluated at
_NOISE = 0.1


@functools.lru_cache(maxsize=2)
def record(length: int, device: str, queries: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced pass of the trained twin over ``length`` held-out bytes on ``device``.

    Returns float32 ``q [12, Q, 64]`` (the NoPE queries of each recorded KV head at the last
    ``queries`` positions, Q = queries x NoPE heads of that KV head, padded by repetition to a
    common count), ``k, v [12, length, 64]``; recorded head ``i`` is (layer ``i // 2``, KV head
    ``i % 2``). Cached per (length, device).
    """
    from examples.tiny_lm.data import eval_windows, load_split
    from examples.tiny_lm.model import load_pretrained
    from examples.tiny_lm.teacher_forced import prefill

    model = load_pretrained(torch.float32).to(device)
    _, held_out = load_split()
    windows = eval_windows(held_out, length, 1)
    if windows:
        tokens = windows[0][1]
    else:  # no single held-out file is long enough: concatenate them
        stream = b"".join(data for _, data in held_out)[:length]
        if len(stream) < length:
            raise ValueError(f"held-out text has only {len(stream)} bytes, fewer than length={length}")
        tokens = torch.frombuffer(bytearray(stream), dtype=torch.uint8).long()
    tokens = tokens.to(device)

    cfg = model.cfg
    group = cfg.n_heads // cfg.n_kv_heads
    recorded_q: list[torch.Tensor] = []
    original_attend = model.attend

    def hook(q, k, v, bias):  # the last query chunk of each layer sees the whole window
        if k.shape[2] == length:
            recorded_q.append(q[0, :, -queries:].detach())  # [Hq, queries, 64]
        return original_attend(q, k, v, bias)

    model.attend = hook
    try:
        with torch.no_grad():
            _, caches = prefill(model, tokens)
    finally:
        del model.attend
    nope = [h for h in range(cfg.n_heads) if float(model.slopes[h]) == 0.0]
    qs, ks, vs = [], [], []
    for layer, (k, v) in enumerate(caches):
        for kv_head in range(cfg.n_kv_heads):
            heads = [h for h in nope if h // group == kv_head]
            if not heads:
                raise ValueError(f"layer {layer} KV head {kv_head} serves no NoPE query head")
            # positions L-1, L-2, ... outer; heads inner
            per = recorded_q[layer][heads].flip(1).transpose(0, 1).reshape(-1, cfg.head_dim)
            qs.append(per)
            ks.append(k[0, kv_head])
            vs.append(v[0, kv_head])
    count = max(t.shape[0] for t in qs)
    qs = [t.repeat(-(-count // t.shape[0]), 1)[:count] for t in qs]
    return torch.stack(qs).float(), torch.stack(ks).float(), torch.stack(vs).float()


def real(b: int, hq: int, hkv: int, n: int, d: int, dtype: torch.dtype, device, seed: int = 0):
    """``(q [B, Hq, 1, D], K, V [B, Hkv, N, D])`` from the recording, as the module doc says."""
    from benchmarks.seeding import CHUNK, _gen

    device = torch.device(device)
    length = min(REAL_CONTEXT, n)
    rq, rk, rv = record(length, str(device))
    heads, count, dim = rq.shape
    if d < dim:
        raise ValueError(f"D must be >= the recorded head dim {dim}, got {d}")
    group = hq // hkv
    source = (torch.arange(hkv)[None, :] + hkv * torch.arange(b)[:, None]) % heads  # [B, Hkv]
    gain = math.sqrt(d / dim)
    q = torch.zeros(b, hq, 1, d, device=device)
    q[..., :dim] = gain * rq[source.flatten()][:, torch.arange(group) % count].reshape(b, hq, 1, dim)
    std_k = rk.std(1, keepdim=True)  # [heads, 1, dim]
    std_v = rv.std(1, keepdim=True)
    k = torch.zeros(b, hkv, n, d, dtype=dtype, device=device)
    v = torch.zeros(b, hkv, n, d, dtype=dtype, device=device)
    src = source.to(device)
    for index, start in enumerate(range(0, n, CHUNK)):
        stop = min(n, start + CHUNK)
        rows = (torch.arange(start, stop, device=device) - n + length) % length
        copied = torch.arange(start, stop, device=device) < n - length  # rows before the recording
        g = _gen(device, seed, "real", index)
        for dst, rec, std in ((k, rk, std_k), (v, rv, std_v)):
            block = rec[:, rows][src]  # [B, Hkv, c, dim]
            noise = torch.randn(block.shape, generator=g, device=device) * std[src]
            dst[:, :, start:stop, :dim] = torch.where(copied[:, None], block + _NOISE * noise, block).to(dtype)
    return q.to(dtype), k, v
