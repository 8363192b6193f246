"""entmaxkv_compile: support-aware sparse decoding for alpha-entmax attention.

The public surface is small: the math (:func:`entmax`, :func:`entmax_threshold`,
:func:`gaussian_threshold`), the config (:class:`EntmaxKVConfig`), the runtime state
(:class:`KVPageStats`; :class:`PagedKVStats` for a block-table cache), the eager decode (:func:`sparse_decode`; :class:`Decoder` plans once and
runs per step) and the compiler front doors.
Importing the package registers the ``entmaxkv`` torch.library ops.
"""

from .runtime import ops  # noqa: F401  (registers torch.ops.entmaxkv.*)
from .compiler.explain import explain
from .compiler.rewrite import RewriteResult, UnsupportedModelError, rewrite
from .config import EntmaxKVConfig
from .math.gaussian import gaussian_threshold
from .math.reference import entmax, entmax_threshold
from .runtime.decode import sparse_decode
from .runtime.decoder import Decoder
from .runtime.stats.paged import PagedKVStats
from .runtime.stats.reference import KVPageStats
from .runtime.step import DecodeResult

__all__ = [
    "DecodeResult",
    "Decoder",
    "EntmaxKVConfig",
    "KVPageStats",
    "PagedKVStats",
    "RewriteResult",
    "UnsupportedModelError",
    "entmax",
    "entmax_threshold",
    "explain",
    "gaussian_threshold",
    "rewrite",
    "sparse_decode",
]
__version__ = "0.1.0"
