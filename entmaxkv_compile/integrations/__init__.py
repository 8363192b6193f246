"""Integrations with other libraries; each imports its library only when used.

- :func:`register_entmax_attention` (``integrations.transformers``): entmax attention and its mask
  function for Hugging Face transformers, under one ``attn_implementation`` name;
  :func:`compile_config`: the ``CompileConfig`` that makes ``generate()`` use the backend;
  :func:`full_length_static_cache`: a ``StaticCache`` whose sliding-window layers are written at
  the position (the backend rewrites their windows) instead of rolled.
"""

from .transformers import compile_config, entmax_attention, full_length_static_cache, register_entmax_attention

__all__ = ["compile_config", "entmax_attention", "full_length_static_cache", "register_entmax_attention"]
