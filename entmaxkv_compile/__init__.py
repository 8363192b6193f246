"""entmaxkv_compile: support-aware sparse decoding for alpha-entmax attention.

The public surface is small: the math (:func:`entmax`, :func:`entmax_threshold`,
:func:`gaussian_threshold`), the config (:class:`EntmaxKVConfig`), the runtime state
(:class:`KVPageStats`), the eager decode (:func:`sparse_decode`) and the compiler front doors.
"""

from .config import EntmaxKVConfig
from .reference import entmax, entmax_threshold

__all__ = ["EntmaxKVConfig", "entmax", "entmax_threshold"]
__version__ = "0.1.0"
