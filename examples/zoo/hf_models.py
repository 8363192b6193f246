"""Tiny transformers Llama-, Qwen2- and Gemma-2-style models with entmax attention (random weights).

An entmax attention function is registered through ``transformers.AttentionInterface`` (and the
same name in ``AttentionMaskInterface``: in transformers 5.x a custom attention without a mask
function receives ``attention_mask=None`` and would attend to unwritten cache rows). Models are
built from local configs, so nothing is downloaded, and run with a ``StaticCache`` and
``generate()``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from transformers import (AttentionInterface, AttentionMaskInterface, Gemma2Config, Gemma2ForCausalLM,
                          GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          StaticCache)
from transformers.masking_utils import eager_mask

from .weights import WEIGHTS


def repeat_kv(hidden: torch.Tensor, groups: int) -> torch.Tensor:
    """HF's GQA expansion: ``[B, Hkv, N, D] -> [B, Hkv*groups, N, D]`` by expand + reshape."""
    if groups == 1:
        return hidden
    batch, heads, length, dim = hidden.shape
    hidden = hidden[:, :, None, :, :].expand(batch, heads, groups, length, dim)
    return hidden.reshape(batch, heads * groups, length, dim)


def make_attention(weights: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """An HF attention function (eager layout) normalizing with ``WEIGHTS[weights]``."""
    fn = WEIGHTS[weights][0]

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs: Any):
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        softcap = kwargs.get("softcap")
        if softcap is not None:  # Gemma-2's attn_logit_softcapping, as its eager attention spells it
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        probs = fn(scores)
        out = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return out, probs

    return attention


def register(weights: str) -> str:
    """Register attention + mask functions named ``entmaxkv_zoo_<weights>``; return the name."""
    name = f"entmaxkv_zoo_{weights}"
    AttentionInterface.register(name, make_attention(weights))
    AttentionMaskInterface.register(name, eager_mask)
    return name


def _common(vocab: int, layers: int, heads: int, kv_heads: int, hidden: int) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                rms_norm_eps=1e-6, tie_word_embeddings=False)


def build_llama(weights: str = "entmax15", *, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                hidden: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(**_common(96, layers, heads, kv_heads, hidden), attention_bias=False)
    return _finish(LlamaForCausalLM, config, weights, seed, dtype)


def build_qwen2(weights: str = "bisect_1.25", *, layers: int = 2, heads: int = 8, kv_heads: int = 2,
                hidden: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    config = Qwen2Config(**_common(96, layers, heads, kv_heads, hidden), use_sliding_window=False)
    return _finish(Qwen2ForCausalLM, config, weights, seed, dtype)


def build_gemma2(weights: str = "entmax15", *, layers: int = 1, heads: int = 4, kv_heads: int = 2,
                 hidden: int = 64, softcap: float = 10.0, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Gemma2ForCausalLM:
    """Gemma-2 with ``attn_logit_softcapping=softcap`` (its attention passes ``softcap`` to the
    attention function) and global attention on every layer (Gemma-2 alternates sliding-window
    layers: in the zoo's ``StaticCache`` they roll, which the backend refuses, so they are left out
    here; ``tests/test_integrations_hf.py`` decodes them in a full-length cache)."""
    head_dim = hidden // heads
    config = Gemma2Config(**_common(96, layers, heads, kv_heads, hidden), head_dim=head_dim,
                          query_pre_attn_scalar=head_dim, attn_logit_softcapping=softcap,
                          layer_types=["full_attention"] * layers, sliding_window=256)
    return _finish(Gemma2ForCausalLM, config, weights, seed, dtype)


def _finish(cls, config, weights: str, seed: int, dtype: torch.dtype):
    config._attn_implementation = register(weights)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    with torch.no_grad():  # larger q/k weights give peaked scores: a sparse entmax, as in trained models
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@torch.no_grad()
def generate(model, prompt: torch.Tensor, steps: int, *, max_cache_len: int = 96,
             forward: Optional[Callable[..., Any]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate()`` with a fresh ``StaticCache``: ``(new tokens [B, steps], logits [B, steps, V])``.

    ``forward`` (e.g. a compiled ``model.forward``) replaces the model's forward for this call.
    """
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              disable_compile=True, pad_token_id=0, eos_token_id=None, output_logits=True,
                              return_dict_in_generate=True)
    original = model.forward
    if forward is not None:
        model.forward = forward
    try:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                             generation_config=config)
    finally:
        if forward is not None:
            model.forward = original
    return out.sequences[:, prompt.shape[1]:], torch.stack(out.logits, 1)
