"""A gpt-fast-style decoder with a static KV cache and entmax attention.

Plain modules, one visible line per trick, as in gpt-fast: static ``k_cache``/``v_cache``
buffers written at ``input_pos``, RoPE, GQA, a causal mask built from ``input_pos``. The knobs in
:class:`ModelArgs` select how attention is *spelled* (score product, GQA expansion, mask, where
the scale goes, ALiBi, cache write, weight function), so the graph passes meet the variety of
real models. ``generate`` is the usual prefill + greedy decode loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .weights import WEIGHTS, PerHeadAlpha


@dataclass
class ModelArgs:
    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    dim: int = 64
    max_seq_len: int = 96
    rope: bool = True
    weights: str = "entmax15"
    scores: str = "matmul"  # matmul | einsum | bmm | baddbmm
    gqa: str = "repeat_interleave"  # repeat_interleave | expand | expand_flat (.expand for MQA,
    # .flatten(1, 2) for GQA) | broadcast (the matmuls broadcast a single KV head) | tiled (h reads h % Hkv)
    mask: str = "masked_fill"  # masked_fill | additive | where | buffer (gpt-fast's tril buffer) | none
    scale_on: str = "scores"  # scores | q
    alibi: str = "none"  # none | all | half (ALiBi on the first half of the heads, NoPE on the rest)
    kv_write: str = "setitem"  # setitem | index_copy | scatter (per-row decode writes only)
    kv_fused: bool = False  # one buffer kv[2, B, H, N, D]: K is kv[0], V is kv[1]
    window: int = 0  # > 0: sliding window, key j visible from query i when i - window < j <= i
    sink: int = 0  # with a window: the first `sink` keys stay visible too (attention sinks: a hole, refused)
    rolling: int = 0  # > 0: rolling-buffer cache of that many slots written at pos % rolling (Mistral)
    temperature: float = 4.0  # scales the scores so the random model's entmax is sparse
    head_alphas: tuple[float, ...] = ()  # one learnable alpha per head (entmax_bisect with a tensor alpha)
    positions: str = "shared"  # shared | per_row (a decode step takes input_pos [B]: one position per sequence)
    row_mask: str = "own"  # per_row decode masks: own (row b sees 0..pos[b]) | ahead (0..pos[b]+1) | first (0..pos[0])
    softcap: float = 0.0  # > 0: logit soft-cap cap * tanh(s / cap) before the mask, as Gemma-2 (0 = off)
    softcap_form: str = "div"  # div: cap * tanh(s / cap) | mul: tanh(s * (1/cap)) * cap | after_mask: the
    # mask added before the cap (masked scores become -cap: refused) | buffer: the cap a module buffer (refused)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class KVCache(nn.Module):
    def __init__(self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 write: str, rolling: int = 0, fused: bool = False, per_row: bool = False) -> None:
        super().__init__()
        shape = (batch, kv_heads, rolling or max_seq_len, head_dim)
        if fused:
            self.register_buffer("kv", torch.zeros((2, *shape), dtype=dtype), persistent=False)
        else:
            self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.write = write
        self.rolling = rolling
        self.fused = fused
        self.per_row = per_row  # a decode step (one new token) takes one position per sequence

    def _update_rows(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """A ragged decode step: sequence ``b`` writes its new row at its own ``input_pos[b]``."""
        if self.write == "scatter":  # one index per element: row b's position over every head and feature
            index = input_pos.view(-1, 1, 1, 1).expand_as(k)
            self.k_cache.scatter_(2, index, k)
            self.v_cache.scatter_(2, index, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k_cache[rows, :, input_pos] = k[:, :, 0]
            self.v_cache[rows, :, input_pos] = v[:, :, 0]
        return self.k_cache, self.v_cache

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.per_row and k.shape[2] == 1:
            return self._update_rows(input_pos, k, v)
        if self.rolling:  # slot pos % W holds the newest token; once wrapped, every slot is valid
            input_pos = input_pos % self.rolling
        if self.fused:  # vLLM-style one allocation for K and V
            if self.write == "index_copy":
                self.kv[0].index_copy_(2, input_pos, k)
                self.kv[1].index_copy_(2, input_pos, v)
            else:
                self.kv[:, :, :, input_pos] = torch.stack([k, v])
            return self.kv[0], self.kv[1]
        if self.write == "index_copy":
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
        else:
            self.k_cache[:, :, input_pos] = k
            self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


def alibi_slopes(n_head: int, mode: str) -> torch.Tensor:
    """The ALiBi geometric slopes; with ``mode="half"`` the second half of the heads get 0 (NoPE)."""
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / n_head) for i in range(n_head)])
    if mode == "half":
        slopes[n_head // 2:] = 0.0
    return slopes


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        d = args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.n_kv_head) * d, bias=False)
        self.wo = nn.Linear(args.n_head * d, args.dim, bias=False)
        self.weights: Callable[[torch.Tensor], torch.Tensor] = WEIGHTS[args.weights][0]
        if args.head_alphas:
            self.weights = PerHeadAlpha(list(args.head_alphas))
        self.kv_cache: Optional[KVCache] = None
        if args.alibi != "none":
            self.register_buffer("slopes", alibi_slopes(args.n_head, args.alibi), persistent=False)
        if args.softcap and args.scores == "baddbmm":
            raise ValueError("softcap needs the mask added after the cap; scores='baddbmm' adds it in the product")
        if args.softcap_form == "buffer":
            self.register_buffer("cap", torch.tensor(float(args.softcap)), persistent=False)
        if args.mask == "buffer":  # gpt-fast: a [max_seq_len, max_seq_len] tril buffer indexed by input_pos
            ones = torch.ones(args.max_seq_len, args.max_seq_len, dtype=torch.bool)
            self.register_buffer("causal_mask", torch.tril(ones), persistent=False)

    def forward(self, x: torch.Tensor, freqs: Optional[torch.Tensor], input_pos: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = self._project(x, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v)
        k, v = self._expand(k), self._expand(v)
        y = self._attend(q, k, v, input_pos)
        return self.wo(y.transpose(1, 2).reshape(batch, seqlen, self.args.n_head * self.args.head_dim))

    def _project(self, x: torch.Tensor, freqs: Optional[torch.Tensor]):
        """``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` of the step's tokens, rotated when ``freqs``."""
        a = self.args
        batch, seqlen, _ = x.shape
        d, hq, hkv = a.head_dim, a.n_head, a.n_kv_head
        q, k, v = self.wqkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(batch, seqlen, hq, d), k.view(batch, seqlen, hkv, d), v.view(batch, seqlen, hkv, d)
        if freqs is not None:
            q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        return q, k, v

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        group = self.args.n_head // self.args.n_kv_head
        if group == 1:
            return t
        if self.args.gqa == "expand":  # HF repeat_kv
            b, h, n, d = t.shape
            return t[:, :, None, :, :].expand(b, h, group, n, d).reshape(b, h * group, n, d)
        if self.args.gqa == "expand_flat":  # MQA: one KV head expanded to every query head (no copy)
            b, h, n, d = t.shape
            return t.expand(b, h * group, n, d) if h == 1 else \
                t.unsqueeze(2).expand(-1, -1, group, -1, -1).flatten(1, 2)
        if self.args.gqa == "broadcast":  # MQA: the score/value matmuls broadcast the size-1 head axis
            return t
        if self.args.gqa == "tiled":  # query head h reads KV head h % Hkv: not the GQA map of the kernels
            b, h, n, d = t.shape
            return t[:, None].expand(b, group, h, n, d).reshape(b, h * group, n, d)
        return t.repeat_interleave(group, dim=1)

    def _attend(self, q, k, v, input_pos):
        a = self.args
        batch, heads, seqlen, d = q.shape
        n = k.shape[2]
        scale = a.temperature / math.sqrt(d)
        per_row = a.positions == "per_row" and seqlen == 1  # row b's query sits at input_pos[b]
        if not per_row:
            i = input_pos.view(1, 1, seqlen, 1)
        elif a.row_mask == "own":
            i = input_pos.view(batch, 1, 1, 1)
        elif a.row_mask == "ahead":  # a wrong mask (shows the row after the one written): must be refused
            i = input_pos.view(batch, 1, 1, 1) + 1
        else:  # "first": every row masked by row 0's position, wrong for the others: must be refused
            i = input_pos[0].view(1, 1, 1, 1)
        j = torch.arange(n, device=q.device).view(1, 1, 1, n)
        if a.mask != "buffer":
            causal = j <= i
        elif per_row:  # a ragged step takes row input_pos[b] of the buffer for sequence b
            causal = self.causal_mask[input_pos][:, None, None]
        else:
            causal = self.causal_mask[None, None, input_pos]
        if a.window:
            inside = i - j < a.window
            if a.sink:
                inside = inside | (j < a.sink)
            causal = causal & inside
        bias = None
        if a.alibi != "none":
            bias = self.slopes.view(1, heads, 1, 1) * (j - i).to(q.dtype)
        if a.scores == "baddbmm":
            additive = torch.where(causal, 0.0, torch.finfo(q.dtype).min).to(q.dtype)
            if bias is not None:
                additive = additive + bias
            additive = additive.expand(batch, heads, seqlen, n).reshape(batch * heads, seqlen, n)
            s = torch.baddbmm(additive, q.reshape(batch * heads, seqlen, d),
                              k.reshape(batch * heads, n, d).transpose(1, 2), alpha=scale)
            p = self.weights(s.view(batch, heads, seqlen, n))
            return torch.bmm(p.reshape(batch * heads, seqlen, n), v.reshape(batch * heads, n, d)).view(
                batch, heads, seqlen, d)
        if a.scale_on == "q":
            q = q * scale
        if a.scores == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        elif a.scores == "bmm":
            s = torch.bmm(q.reshape(batch * heads, seqlen, d), k.reshape(batch * heads, n, d).transpose(1, 2))
            s = s.view(batch, heads, seqlen, n)
        else:
            s = q @ k.transpose(-2, -1)
        if a.scale_on != "q":
            s = s * scale
        if a.softcap and a.softcap_form != "after_mask":
            s = self._softcap(s)
        if bias is not None:
            s = s + bias
        if a.mask == "additive":
            s = s + torch.where(causal, 0.0, torch.finfo(s.dtype).min).to(s.dtype)
        elif a.mask == "where":
            s = torch.where(causal, s, float("-inf"))
        elif a.mask == "none":  # attends every cache row, written or not
            pass
        else:
            s = s.masked_fill(~causal, float("-inf"))
        if a.softcap and a.softcap_form == "after_mask":
            s = self._softcap(s)
        p = self.weights(s)
        if a.scores == "einsum":
            return torch.einsum("bhqk,bhkd->bhqd", p, v)
        return torch.matmul(p, v)


    def _softcap(self, s: torch.Tensor) -> torch.Tensor:
        """Gemma-2's logit soft-cap ``cap * tanh(s / cap)``, spelled as ``softcap_form`` says."""
        cap = self.args.softcap
        if self.args.softcap_form == "mul":
            return torch.tanh(s * (1.0 / cap)) * cap
        if self.args.softcap_form == "buffer":
            return self.cap * torch.tanh(s / self.cap)
        return cap * torch.tanh(s / cap)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs = freqs.view(-1, xs.size(1), 1, xs.size(3), 2)  # [1, T, ...] shared, [B, 1, ...] per row
    out = torch.stack([xs[..., 0] * freqs[..., 0] - xs[..., 1] * freqs[..., 1],
                       xs[..., 1] * freqs[..., 0] + xs[..., 0] * freqs[..., 1]], -1)
    return out.flatten(3).type_as(x)


def precompute_freqs(seq_len: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len).float(), inv)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        hidden = 2 * args.dim
        self.feed_forward = nn.Sequential(nn.Linear(args.dim, hidden), nn.SiLU(), nn.Linear(hidden, args.dim))
        self.attention_norm = nn.RMSNorm(args.dim)
        self.ffn_norm = nn.RMSNorm(args.dim)

    def forward(self, x, freqs, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = nn.RMSNorm(args.dim)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.rope:
            self.register_buffer("freqs", precompute_freqs(args.max_seq_len, args.head_dim), persistent=False)

    def setup_caches(self, batch: int, dtype: torch.dtype = torch.float32) -> None:
        a = self.args
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, a.n_kv_head, a.max_seq_len, a.head_dim, dtype, a.kv_write,
                                               a.rolling, a.kv_fused, a.positions == "per_row").to(
                                                   self.output.weight.device)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        freqs = self.freqs[input_pos] if self.args.rope else None
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs, input_pos)
        return self.output(self.norm(x))


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, steps: int,
             decode: Optional[Callable[..., torch.Tensor]] = None,
             prefill: Optional[Callable[..., torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding: ``(tokens [B, steps], logits [B, steps, V])`` of the decode steps.

    ``prefill``/``decode`` default to ``model``; pass compiled versions to compare.
    """
    prefill = model if prefill is None else prefill
    decode = model if decode is None else decode
    batch, length = prompt.shape
    logits = prefill(prompt, torch.arange(length, device=prompt.device))[:, -1]
    tokens, all_logits = [], []
    token = logits.argmax(-1, keepdim=True)
    for step in range(steps):
        logits = decode(token, torch.tensor([length + step], device=prompt.device))[:, -1]
        all_logits.append(logits.clone())
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


def ragged_lengths(batch: int, length: int) -> torch.Tensor:
    """Prompt lengths of a ragged batch: ``length``, ``length - 3``, ``length - 6``, ... (at least 2)."""
    return torch.tensor([max(2, length - 3 * b) for b in range(batch)])


@torch.no_grad()
def generate_ragged(model: nn.Module, prompt: torch.Tensor, lengths: torch.Tensor, steps: int,
                    decode: Optional[Callable[..., torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of a ragged batch: sequence ``b`` is ``prompt[b, :lengths[b]]``.

    The prefill runs the right-padded batch with the model itself (shared positions; row ``b``'s
    cache rows ``0..lengths[b]-1`` are its own prompt's, the causal mask keeps the padding after
    them out); each decode step then takes ``input_pos = lengths + step`` of shape ``[B]`` and
    overwrites the padding rows as it goes. ``decode`` defaults to ``model``. The prefill is not
    compiled: a compiled right-padded prefill would record the padding rows as written in the page
    statistics, so each shorter row's first append would be out of order (docs/backend.md,
    Limitations); uncompiled, the first decode graph fills each row's statistics up to its length.
    """
    decode = model if decode is None else decode
    batch, length = prompt.shape
    lengths = lengths.to(prompt.device)
    logits = model(prompt, torch.arange(length, device=prompt.device))
    logits = logits[torch.arange(batch, device=prompt.device), lengths - 1]
    tokens, all_logits = [], []
    token = logits.argmax(-1, keepdim=True)
    for step in range(steps):
        logits = decode(token, lengths + step)[:, -1]
        all_logits.append(logits.clone())
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


def build(args: ModelArgs, batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
          device: str = "cpu") -> Transformer:
    """A random-weight model with its caches set up (deterministic given ``seed``)."""
    torch.manual_seed(seed)
    model = Transformer(args).to(device=device, dtype=dtype).eval()
    model.setup_caches(batch, dtype)
    return model


__all__ = ["ModelArgs", "Transformer", "build", "generate", "generate_ragged", "ragged_lengths"]
