"""Integrations with other libraries; each imports its library only when used.

- :func:`register_entmax_attention` (``integrations.transformers``): entmax attention and its mask
  function for Hugging Face transformers, under one ``attn_implementation`` name;
  :func:`compile_config`: the ``CompileConfig`` that makes ``generate()`` use the backend.
"""

from .transformers import compile_config, entmax_attention, register_entmax_attention

__all__ = ["compile_config", "entmax_attention", "register_entmax_attention"]
