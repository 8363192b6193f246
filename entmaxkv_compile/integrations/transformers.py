"""Entmax attention for Hugging Face transformers models, in one call.

:func:`register_entmax_attention` registers an attention function under
``transformers.AttentionInterface`` and the mask function it needs under
``transformers.AttentionMaskInterface``, both under one name, so

```python
register_entmax_attention("entmax15", alpha=1.5)
model = AutoModelForCausalLM.from_config(config, attn_implementation="entmax15")
```

gives a model whose attention normalizes with α-entmax instead of softmax, eagerly and under
``torch.compile(..., backend="entmaxkv")`` (whose passes find and rewrite its decode steps).

Why the mask function: transformers 5.x builds the attention mask with the function registered
under the model's ``attn_implementation`` name and passes ``attention_mask=None`` to an attention
function that has none, so a custom attention over a ``StaticCache`` would attend to cache rows
not yet written. The registered mask is transformers' own eager mask (additive: 0 where a key is
visible, the dtype's minimum where it is hidden: causal, padding and any window the model's
config asks for), the form the backend proves causal.

transformers is imported only when :func:`register_entmax_attention` runs, so the package works
without it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..checks import check_alpha
from ..math.reference import entmax

__all__ = ["compile_config", "entmax_attention", "full_length_static_cache", "register_entmax_attention"]

#: Keyword arguments transformers passes for attention forms this function does not compute; a
#: non-None value is refused rather than ignored (the result would silently differ from the model's).
_UNSUPPORTED_KWARGS = {
    "s_aux": "attention sinks",
}

#: Names registered by :func:`register_entmax_attention` (they may be registered again).
_REGISTERED: set[str] = set()


def _repeat_kv(hidden: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: ``[B, Hkv, N, D] -> [B, Hkv*groups, N, D]``, query head ``h`` reading KV head ``h // groups``.

    Spelled as transformers' ``repeat_kv`` (expand + reshape), a form the backend recognises.
    """
    if groups == 1:
        return hidden
    batch, heads, length, dim = hidden.shape
    hidden = hidden[:, :, None, :, :].expand(batch, heads, groups, length, dim)
    return hidden.reshape(batch, heads * groups, length, dim)


def entmax_attention(alpha: float) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """An attention function with transformers' eager signature that normalizes with α-entmax.

    ``attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs)`` with
    ``query [B, H, T, D]``, ``key``/``value [B, Hkv, N, D]``, returns ``(output [B, T, H, D],
    weights [B, H, T, N])`` exactly like transformers' ``eager_attention_forward`` with softmax
    replaced by ``entmax(·, alpha)``: GQA through ``module.num_key_value_groups``, scores scaled by
    ``scaling``, Gemma-2's logit soft-cap ``softcap * tanh(scores / softcap)`` when the model
    passes ``softcap`` (``config.attn_logit_softcapping``; before the mask, as Gemma-2's eager
    attention), the additive ``attention_mask`` added (its key axis cut to the keys given), and
    dropout on the weights in training mode. One difference: entmax runs in the scores' dtype,
    where transformers' eager softmax upcasts to float32 first.
    """
    alpha = check_alpha(alpha)

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        for name, form in _UNSUPPORTED_KWARGS.items():
            if kwargs.get(name) is not None:
                raise NotImplementedError(
                    f"entmax attention got {name}={kwargs[name]!r}: {form} is not implemented by "
                    "entmaxkv_compile's transformers attention; use a model config without it")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            raise TypeError("attention_mask must be an additive float mask (the mask function "
                            "register_entmax_attention registers), got a bool mask")
        groups = getattr(module, "num_key_value_groups", 1)
        key = _repeat_kv(key, groups)
        value = _repeat_kv(value, groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        softcap = kwargs.get("softcap")
        if softcap is not None:  # Gemma-2, spelled as its eager attention
            scores = scores / softcap
            scores = torch.tanh(scores)
            scores = scores * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        weights = entmax(scores, alpha=alpha, dim=-1)
        weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
        output = torch.matmul(weights, value).transpose(1, 2).contiguous()
        return output, weights

    attention.__name__ = attention.__qualname__ = f"entmax_attention_{alpha:g}"
    return attention


def register_entmax_attention(name: str = "entmax15", alpha: float = 1.5) -> str:
    """Register α-entmax attention and its mask function under ``name``; return ``name``.

    After this call ``AutoModelForCausalLM.from_config(config, attn_implementation=name)`` (or
    ``from_pretrained(..., attn_implementation=name)``, or ``model.set_attn_implementation(name)``)
    builds a model whose attention is :func:`entmax_attention` ``(alpha)``. Registering the same
    name again replaces the function (e.g. with another ``alpha``). Names transformers already uses
    (``"sdpa"``, ``"eager"``, flash/flex attention, ...) are refused: registering over them would
    change every model in the process.
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import eager_mask
    except ImportError as error:  # pragma: no cover - exercised only where transformers is absent
        raise ImportError("register_entmax_attention needs the transformers package "
                          "(pip install transformers)") from error
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    builtin = (set(AttentionInterface._global_mapping) | set(AttentionMaskInterface._global_mapping)
               | {"eager"}) - set(_REGISTERED)
    if name in builtin:
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations "
                         f"({sorted(builtin)}); choose another name")
    AttentionInterface.register(name, entmax_attention(alpha))
    AttentionMaskInterface.register(name, eager_mask)
    _REGISTERED.add(name)
    return name


def compile_config(options: Optional[dict[str, Any]] = None, *, mode: Optional[str] = None,
                   dynamic: Optional[bool] = False, **kwargs: Any) -> Any:
    """A ``transformers.CompileConfig`` that makes ``generate()`` compile with the ``entmaxkv`` backend.

    ``options`` are the backend's options (``{"selector": "certified", ...}``), ``mode`` an Inductor
    mode (e.g. ``"reduce-overhead"``), other keyword arguments go to ``CompileConfig``
    (``fullgraph``). Why not ``CompileConfig(backend="entmaxkv", options=...)``:
    ``CompileConfig``'s ``mode`` defaults to ``"reduce-overhead"`` and ``torch.compile`` refuses
    ``mode`` together with ``options`` ("Either mode or options can be specified"), so the mode is
    moved into the options, where the backend reads it.

    ``dynamic`` defaults to False (``CompileConfig``'s default is None, automatic): a later
    ``generate()`` with another cache length would otherwise recompile with a symbolic cache
    length, which the backend cannot prove its mask rules for, and the decode sites would be refused.
    """
    from transformers import CompileConfig

    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of entmaxkv backend options, got {type(options).__name__}")
    options = dict(options or {})
    if mode is not None:
        if options.get("mode") not in (None, mode):
            raise ValueError(f"mode given twice: mode={mode!r} and options['mode']={options['mode']!r}")
        options["mode"] = mode
    return CompileConfig(backend="entmaxkv", mode=None, options=options or None, dynamic=dynamic, **kwargs)



def full_length_static_cache(config: Any, max_cache_len: int, **kwargs: Any) -> Any:
    """A ``transformers.StaticCache`` whose sliding-window layers hold all ``max_cache_len`` positions.

    For models with a sliding window (Mistral's ``sliding_window``, the ``"sliding_attention"``
    layers of Gemma-2 and others), ``StaticCache`` keeps only the last ``window`` positions in a
    ``StaticSlidingWindowLayer``: once full, every step rolls the whole buffer by one row and copies
    it back, so every page moves and its statistics would have to be recomputed (the backend
    refuses that site and runs the model's attention). This cache uses a plain ``StaticLayer``
    for those layers instead (written at the position, like every other layer); the model's own
    mask still applies the window, and the backend rewrites the site with ``decode_step``'s
    ``row_start`` at the window's start, so the pages below the window are never read. The price is
    memory: ``max_cache_len`` rows per layer instead of ``window``.

    ``config`` is the model's config (``model.config``); ``kwargs`` go to ``StaticCache``.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
        raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
    cache = StaticCache(config=config, max_cache_len=max_cache_len, **kwargs)
    cache.layers = [StaticLayer(max_cache_len=max_cache_len) if type(layer) is StaticSlidingWindowLayer else layer
                    for layer in cache.layers]
    return cache
