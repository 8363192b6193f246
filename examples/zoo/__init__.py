"""The model zoo: small models that spell entmax attention in the ways real models do.

``ZOO[name]`` is a :class:`ZooEntry`; ``entry.build()`` returns a random-weight model (caches for
``entry.batch`` sequences) and ``entry.generate(model, prompt, steps, compiled)`` runs greedy
decoding (compiled with the given callable, or eagerly). The ``ragged`` family decodes a batch of
different prompt lengths, one position per sequence (``gpt_fast.generate_ragged``); the ``paged``
family keeps its KV cache in a page pool addressed by a shuffled block table (``paged.py``). ``entry.expected`` lists, per attention layer, the ``(kind, alpha, status)``
that ``explain`` must report for a decode graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import gpt_fast, paged
from .gpt_fast import ModelArgs
from .paged import PagedArgs


def _hf() -> Any:
    """transformers is imported only for the HF entries (the GPU image may lack parts of it)."""
    from . import hf_models

    return hf_models


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    family: str  # "gpt_fast", "ragged", "paged" or "hf"
    build: Callable[[], Any]
    layers: int
    kind: str  # "entmax", "hand-written entmax", "softmax"
    alpha: Optional[float]
    decode_status: str  # what explain must say about each decode site
    prefill_status: Optional[str]  # None: the prefill runs uncompiled (a ragged batch's right-padded prompts)
    batch: int = 2

    def generate(self, model: Any, prompt: torch.Tensor, steps: int,
                 compiled: Optional[Callable[..., Any]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.family == "hf":
            return _hf().generate(model, prompt, steps, forward=compiled)
        if self.family == "paged":
            return paged.generate(model, prompt, steps, compiled)
        if self.family == "ragged":
            lengths = gpt_fast.ragged_lengths(*prompt.shape)
            return gpt_fast.generate_ragged(model, prompt, lengths, steps, decode=compiled)
        return gpt_fast.generate(model, prompt, steps, decode=compiled, prefill=compiled)

    def compile_target(self, model: Any) -> Any:
        """What to hand to ``torch.compile``: the module, or ``model.forward`` for HF models."""
        return model.forward if self.family == "hf" else model


def _gpt(name: str, description: str, kind: str, alpha: Optional[float], decode: str, prefill: str,
         **args: Any) -> ZooEntry:
    model_args = ModelArgs(**args)
    return ZooEntry(name, description, "gpt_fast", lambda: gpt_fast.build(model_args), model_args.n_layer,
                    kind, alpha, decode, prefill)


def _ragged(name: str, description: str, **args: Any) -> ZooEntry:
    model_args = ModelArgs(positions="per_row", **args)
    return ZooEntry(name, description, "ragged", lambda: gpt_fast.build(model_args, batch=3), model_args.n_layer,
                    "entmax", 1.5, "rewritten", None, batch=3)


def _paged(name: str, description: str, decode: str, prefill: Optional[str], **args: Any) -> ZooEntry:
    model_args = PagedArgs(**args)
    batch = 3 if model_args.positions == "per_row" else 2
    return ZooEntry(name, description, "paged", lambda: paged.build(model_args, batch=batch), model_args.n_layer,
                    "entmax", 1.5, decode, prefill, batch=batch)


_LAZY = "bookkeeping"  # transformers 5.x allocates the StaticCache inside the prefill graph: decode fills the stats

ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    _gpt("gpt_fast_entmax15", "gpt-fast decoder, entmax.entmax15, RoPE, GQA 2:1 (repeat_interleave), "
         "q @ k.transpose, masked_fill, k_cache[:, :, pos] = k", "entmax", 1.5, "rewritten", "bookkeeping",
         n_layer=2),
    _gpt("alibi_half", "Entmax15 module, half-ALiBi/half-NoPE heads, MHA, einsum, additive mask, index_copy_",
         "entmax", 1.5, "rewritten", "bookkeeping", n_layer=1, rope=False, n_kv_head=4, weights="entmax15_module",
         alibi="half", scores="einsum", mask="additive", kv_write="index_copy"),
    _gpt("gqa_4to1", "EntmaxBisect(alpha=4/3) module, GQA 4:1 via expand+reshape, scale pre-applied to q, where",
         "entmax", 4 / 3, "rewritten", "bookkeeping", n_layer=1, n_head=8, n_kv_head=2, gqa="expand",
         scale_on="q", weights="bisect_4/3_module", mask="where"),
    _gpt("mqa_expand", "MQA: one KV head made to match 4 query heads by k.expand(B, Hq, N, D) (no copy)",
         "entmax", 1.5, "rewritten", "bookkeeping", n_layer=1, n_head=4, n_kv_head=1, gqa="expand_flat"),
    _gpt("gqa_flatten", "GQA 3:1 by k.unsqueeze(2).expand(-1, -1, G, -1, -1).flatten(1, 2)", "entmax", 1.5,
         "rewritten", "bookkeeping", n_layer=1, n_head=6, n_kv_head=2, dim=48, gqa="expand_flat"),
    _gpt("mqa_broadcast", "MQA left to the matmuls: q [B, Hq, 1, D] @ k [B, 1, D, N] broadcasts the KV head",
         "entmax", 1.5, "rewritten", "bookkeeping", n_layer=1, n_head=4, n_kv_head=1, gqa="broadcast"),
    _gpt("fused_kv", "K and V in one buffer kv[2, B, H, N, D] written by kv[0].index_copy_(2, pos, k), read as "
         "kv[0], kv[1]", "entmax", 1.5, "rewritten", "bookkeeping", n_layer=2, kv_fused=True, kv_write="index_copy"),
    _gpt("fused_kv_setitem", "a fused kv[2, B, H, N, D] buffer written whole: kv[:, :, :, pos] = stack([k, v])",
         "entmax", 1.5, "rewritten", "bookkeeping", n_layer=1, kv_fused=True),
    _gpt("head_alpha_shared", "a learnable per-head alpha tensor passed to entmax_bisect, equal on every head "
         "(proved one constant, guarded unchanged)", "entmax", 1.5, "rewritten", "bookkeeping", n_layer=1,
         head_alphas=(1.5, 1.5, 1.5, 1.5)),
    _gpt("head_alpha", "a per-head alpha tensor [1.5, 1.25, 2, 1.5] passed to entmax_bisect: decode_step takes one "
         "alpha, so refused (the model's attention runs)", "entmax", None, "refused", "refused", n_layer=1,
         head_alphas=(1.5, 1.25, 2.0, 1.5)),
    _gpt("sparsemax", "entmax.sparsemax, bmm on [B*H, T, D] reshapes", "entmax", 2.0, "rewritten", "bookkeeping",
         n_layer=1, weights="sparsemax", scores="bmm"),
    _gpt("bisect_1.25", "entmax.entmax_bisect(alpha=1.25), ALiBi on all heads, baddbmm with the mask as input",
         "entmax", 1.25, "rewritten", "bookkeeping", n_layer=1, rope=False, weights="bisect_1.25",
         scores="baddbmm", alibi="all"),
    _gpt("own_entmax", "entmaxkv_compile.entmax(alpha=2)", "entmax", 2.0, "rewritten", "bookkeeping",
         n_layer=1, weights="own_entmax_2"),
    _gpt("handwritten", "hand-written sort-based 1.5-entmax (found structurally, confirmed numerically)",
         "hand-written entmax", 1.5, "rewritten", "bookkeeping", n_layer=1, weights="handwritten"),
    _gpt("gpt_fast_mask_buffer", "gpt-fast's own mask: causal_mask[None, None, input_pos] over a torch.tril(ones) "
         "buffer (proved from the whole buffer's content)", "entmax", 1.5, "rewritten", "bookkeeping",
         n_layer=1, mask="buffer"),
    _gpt("sliding_window", "entmax15 with a sliding window of 52 keys (Mistral: i - 52 < j <= i; not a multiple "
         "of the page size): proved from the mask, row_start = max(0, pos - 51)", "entmax", 1.5, "rewritten",
         "bookkeeping", n_layer=1, window=52),
    _gpt("window_short", "a sliding window of 7 keys, shorter than the prompt: every decode step hides keys",
         "entmax", 1.5, "rewritten", "bookkeeping", n_layer=2, window=7),
    _gpt("window_wide", "a sliding window of 200 keys over a 96-row cache: hides nothing, proved causal",
         "entmax", 1.5, "rewritten", "bookkeeping", n_layer=1, window=200),
    _gpt("window_alibi_buffer", "a window of 9 keys over gpt-fast's tril mask buffer, ALiBi on every head (MHA)",
         "entmax", 1.5, "rewritten", "bookkeeping", n_layer=1, rope=False, n_kv_head=4, alibi="all",
         mask="buffer", window=9),
    _gpt("window_sink", "a window of 20 keys that also shows key 0 (an attention sink): a hole in the hidden "
         "keys, not a window decode_step computes, refused", "entmax", 1.5, "refused", "bookkeeping", n_layer=1,
         window=20, sink=1),
    _gpt("rolling_buffer", "entmax15 over a Mistral-style rolling cache of 52 slots written at pos % 52: proved "
         "for every position (min(pos + 1, 52) slots attended), the written page's statistics rebuilt",
         "entmax", 1.5, "rewritten", "bookkeeping", n_layer=1, rolling=52),
    _gpt("not_quite", "an entmax-like tail thresholded at the row mean: not entmax, never rewritten",
         "hand-written entmax", None, "not-entmax", "not-entmax", n_layer=1, weights="not_quite"),
    _gpt("softmax", "the same decoder with softmax: the graph must be left untouched", "softmax", None,
         "not-entmax", "not-entmax", n_layer=1, weights="softmax"),
    _gpt("softcap_gemma", "Gemma-2 logit soft-capping: scores = 30 * tanh(scores / 30) before the causal mask "
         "(rewritten with the cap; the page bounds are capped)", "entmax", 1.5, "rewritten", "bookkeeping",
         n_layer=1, softcap=30.0),
    _gpt("softcap_after_mask", "a soft-cap applied after the mask (tanh(-inf) = -1: masked scores become -cap, "
         "not hidden): refused", "entmax", 1.5, "refused", "refused", n_layer=1, softcap=5.0,
         softcap_form="after_mask"),
    _ragged("ragged_positions", "a ragged batch of 3 prompts (12, 9, 6 tokens, right-padded prefill): each decode "
            "step takes input_pos [B] and writes k_cache[arange(B), :, input_pos] = k; mask j <= input_pos[b]",
            n_layer=2),
    _ragged("ragged_alibi_buffer", "ragged positions with ALiBi (MHA, no RoPE), gpt-fast's tril mask buffer "
            "read per row (causal_mask[input_pos][:, None, None]) and a scatter_ write of each row at its position",
            n_layer=1, rope=False, n_kv_head=4, alibi="all", mask="buffer", kv_write="scatter"),
    _ragged("ragged_window", "a ragged batch of 3 prompts with a sliding window of 10 keys: each row's window "
            "starts at its own input_pos[b] - 9", n_layer=1, window=10),
    _paged("paged_table", "vLLM-style paged KV: k_pool/v_pool [num_blocks, 16, Hkv, D] written at slot "
           "block_table[b, pos // 16] * 16 + pos % 16 (index_put_ on pool.view(-1, Hkv, D)), gathered as "
           "k_pool[block_table].reshape(B, N, Hkv, D).transpose(1, 2); a shuffled table is a forward input",
           "rewritten", "bookkeeping", n_layer=2),
    _paged("paged_ragged", "the paged model on a ragged batch of 3 prompts (12, 9, 6 tokens): input_pos [B], "
           "each row written at its own block and offset (index_copy_ on the flat pool)", "rewritten", None,
           n_layer=1, positions="per_row", write="index_copy"),
    _paged("paged_table_buffer", "the paged model with its block table a module buffer (a graph input once "
           "lifted) and the write flat[slot] = k, ALiBi on every head (MHA, no RoPE)", "rewritten", "bookkeeping",
           n_layer=1, table="buffer", write="setitem", rope=False, n_kv_head=4, alibi="all"),
    _paged("paged_reversed", "pages gathered as k_pool[block_table.flip(1)]: not the table's page order, "
           "refused", "refused", "refused", n_layer=1, gather="reversed"),
    _paged("paged_arange_table", "the block table built inside the step (torch.arange(B * max_pages).view(B, -1)): "
           "not a graph input, refused", "refused", "refused", n_layer=1, table="arange"),
    _paged("paged_write_ignores_table", "a buggy write at slot b * max_pages * 16 + pos (as if contiguous) under "
           "a read through the table: the write is not at the position's block, refused", "refused", "refused",
           n_layer=1, write="no_table"),
    ZooEntry("hf_llama", "transformers Llama, entmax15 via AttentionInterface, StaticCache, generate()",
             "hf", lambda: _hf().build_llama("entmax15", layers=1), 1, "entmax", 1.5, "rewritten", _LAZY),
    ZooEntry("hf_qwen2", "transformers Qwen2, entmax_bisect(alpha=1.25), GQA 4:1, StaticCache, generate()",
             "hf", lambda: _hf().build_qwen2("bisect_1.25", layers=1), 1, "entmax", 1.25, "rewritten", _LAZY),
    ZooEntry("hf_gemma2", "transformers Gemma-2, attn_logit_softcapping=5 (tanh cap before the mask), entmax15, "
             "global attention, StaticCache, generate()", "hf",
             lambda: _hf().build_gemma2("entmax15", layers=1, softcap=5.0), 1, "entmax", 1.5, "rewritten", _LAZY),
)}

__all__ = ["ZOO", "ZooEntry"]
