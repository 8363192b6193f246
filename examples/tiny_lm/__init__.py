"""A small trained entmax language model: the project's test subject for sparse decoding on real activations."""

from .model import (
    PRETRAINED_ENTMAX15,
    TinyLM,
    TinyLMConfig,
    alibi_slopes,
    attention_probs,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)

__all__ = [
    "PRETRAINED_ENTMAX15",
    "TinyLM",
    "TinyLMConfig",
    "alibi_slopes",
    "attention_probs",
    "load_checkpoint",
    "load_pretrained",
    "save_checkpoint",
]
