"""A small byte-level decoder with entmax (or softmax) attention, GQA and half-ALiBi/half-NoPE heads.

The model is the project's own test subject for sparse decoding on real activations: its attention is
written the plain way (scores = q k^T * scale + bias, entmax over the keys, times V, GQA through
``repeat_interleave``) so the compiler passes can find it, and its decode step reads and writes
static KV buffers ``[B, Hkv, Nmax, D]`` in the layout of ``docs/ARCHITECTURE.md``.

Even query heads carry an ALiBi bias ``slope_h * (j - i)``; odd heads have no positional signal at
all (NoPE, causal masking only). Both extrapolate past the training length.
``alpha = 1`` means softmax; ``alpha > 1`` means alpha-entmax via :func:`entmaxkv_compile.entmax`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from entmaxkv_compile import entmax

__all__ = [
    "PRETRAINED_ENTMAX15",
    "TinyLMConfig",
    "TinyLM",
    "alibi_slopes",
    "attention_probs",
    "load_checkpoint",
    "load_pretrained",
    "save_checkpoint",
]

# The committed entmax15 twin (trained by examples/train_tiny_lm.py; see benchmarks/QUALITY.md).
PRETRAINED_ENTMAX15 = Path(__file__).resolve().parent / "tiny_lm_entmax15.safetensors"


@dataclass(frozen=True)
class TinyLMConfig:
    """Shape and attention type of :class:`TinyLM` (stored in the checkpoint's metadata)."""

    vocab_size: int = 256
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    head_dim: int = 64
    mlp_hidden: int = 512
    alpha: float = 1.5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads must be a multiple of n_kv_heads, got {self.n_heads} and {self.n_kv_heads}"
            )
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 1.0):
            raise ValueError(f"alpha must be a float >= 1 (1 = softmax), got {self.alpha!r}")


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-query-head ALiBi slopes: a geometric series on even heads, 0 (NoPE) on odd heads."""
    n_alibi = (n_heads + 1) // 2
    slopes = torch.zeros(n_heads)
    slopes[0::2] = torch.tensor([2.0 ** (-8.0 * (i + 1) / n_alibi) for i in range(n_alibi)])
    return slopes


def attention_probs(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Softmax (alpha = 1) or alpha-entmax over the last axis, computed in float32."""
    scores = scores.float()
    if alpha == 1.0:
        return torch.softmax(scores, dim=-1)
    return entmax(scores, alpha=alpha, dim=-1)


class RMSNorm(nn.Module):
    """RMS normalisation with a learned gain."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-6)


class Block(nn.Module):
    """Pre-norm transformer block; attention is split into ``qkv`` and ``finish`` for decode studies."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.d_model)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.w_in = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w_out = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, Hq, T, D]`` and k, v ``[B, Hkv, T, D]`` of the residual stream ``x [B, T, C]``."""
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, t, self.cfg.n_heads, self.cfg.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, t, self.cfg.n_kv_heads, self.cfg.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, t, self.cfg.n_kv_heads, self.cfg.head_dim).transpose(1, 2)
        return q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual update from the attention output ``attn [B, Hq, T, D]``, then the MLP."""
        b, _, t, _ = attn.shape
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, -1))
        return x + self.w_out(F.gelu(self.w_in(self.mlp_norm(x))))


class TinyLM(nn.Module):
    """Byte-level decoder: embedding (tied with the output), ``n_layers`` blocks, final norm."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-byte logits (float32) from the last residual stream."""
        return F.linear(self.norm(x), self.embed.weight).float()

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """``probs(q k^T * scale + bias) @ v`` with GQA; ``bias`` holds ALiBi and ``-inf`` masks."""
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias
        probs = attention_probs(scores, self.cfg.alpha)
        return torch.matmul(probs.to(v.dtype), v)

    def causal_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``[Hq, Tq, Tk]`` float32: ``slope_h * (j - i)`` where ``j <= i``, else ``-inf``."""
        rel = (k_pos[None, :] - q_pos[:, None]).float()
        bias = self.slopes[:, None, None] * rel
        return bias.masked_fill(rel > 0, float("-inf"))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Causal logits ``[B, T, vocab]`` for byte ids ``idx [B, T]`` (training and scoring)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T] byte ids, got shape {tuple(idx.shape)}")
        pos = torch.arange(idx.shape[1], device=idx.device)
        bias = self.causal_bias(pos, pos)
        x = self.embed(idx)
        for block in self.blocks:
            q, k, v = block.qkv(x)
            x = block.finish(x, self.attend(q, k, v, bias))
        return self.logits(x)

    def new_cache(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed static KV buffers, one ``(k, v)`` pair ``[B, Hkv, max_len, D]`` per layer."""
        dtype = dtype or self.embed.weight.dtype
        shape = (batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim)
        device = self.embed.weight.device
        return [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in self.blocks
        ]

    def decode_step(
        self, token: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], pos: int
    ) -> torch.Tensor:
        """Logits ``[B, vocab]`` for one token per sequence at position ``pos``.

        Writes this step's k, v into the static buffers at ``pos`` and attends over rows
        ``[0, pos]`` (gpt-fast style); rows past ``pos`` are masked out.
        """
        if token.dim() != 1:
            raise ValueError(f"token must be [B] byte ids, got shape {tuple(token.shape)}")
        max_len = cache[0][0].shape[2]
        if not 0 <= pos < max_len:
            raise ValueError(f"pos must lie in [0, {max_len}), got {pos}")
        k_pos = torch.arange(max_len, device=token.device)
        bias = self.causal_bias(torch.tensor([pos], device=token.device), k_pos)
        x = self.embed(token[:, None])
        for block, (k_cache, v_cache) in zip(self.blocks, cache):
            q, k, v = block.qkv(x)
            k_cache[:, :, pos] = k[:, :, 0].to(k_cache.dtype)
            v_cache[:, :, pos] = v[:, :, 0].to(v_cache.dtype)
            x = block.finish(x, self.attend(q, k_cache.to(q.dtype), v_cache.to(q.dtype), bias))
        return self.logits(x)[:, 0]


def save_checkpoint(model: TinyLM, path: str | Path, extra: dict[str, str] | None = None) -> None:
    """Write the weights as fp16 safetensors with the config (and ``extra`` strings) as metadata."""
    from safetensors.torch import save_file

    state = {name: t.detach().to(torch.float16).contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"config": json.dumps(asdict(model.cfg)), **(extra or {})}
    save_file(state, str(path), metadata=metadata)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[TinyLM, dict[str, str]]:
    """Rebuild a :class:`TinyLM` from :func:`save_checkpoint` output; returns (model, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    if "config" not in metadata:
        raise ValueError(f"{path} has no 'config' metadata; was it written by save_checkpoint?")
    model = TinyLM(TinyLMConfig(**json.loads(metadata["config"])))
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path)).items()})
    return model.to(dtype).eval(), metadata


def load_pretrained(dtype: torch.dtype = torch.float32) -> TinyLM:
    """The committed, trained entmax15 model (:data:`PRETRAINED_ENTMAX15`), in eval mode."""
    return load_checkpoint(PRETRAINED_ENTMAX15, dtype)[0]
