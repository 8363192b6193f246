"""Plan once, run per step: the decoder object of one attention layer (the FlashInfer pattern).

A :class:`Decoder` is built for (config, batch, heads, KV heads, head dim, capacity, dtype,
device). Building it validates all of that once, picks the implementation (Triton kernels on a
GPU, the pure-torch stage references elsewhere) and allocates the page statistics it owns. Its
per-step calls then validate nothing and never synchronise with the host:

* :meth:`Decoder.append` folds the rows the model just wrote into their pages (O(D) per token);
* :meth:`Decoder.run` is one decode step (select, attend, certify) through
  :func:`~entmaxkv_compile.runtime.step.run_step`, the one implementation that the eager API
  (:func:`~entmaxkv_compile.sparse_decode`), the ``entmaxkv::decode_step`` op and the compiled
  graphs share; in certified mode it also advances the read-everything policy
  (``certify/policy.py``) kept with the statistics.

So ``append`` + ``run`` can be captured in a CUDA graph as they are (see
``tests/test_decoder.py``). On a GPU the decoder does that itself by default (``cuda_graph``):
``run`` records the step once per cache (``runtime/graphed.py``) and replays it, so an eager call
costs one graph launch and a few copies instead of ~15 kernel launches and their Python wrappers.
The kernels' scratch buffers come from that graph's private memory pool.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import check_alibi_slopes, check_decode_inputs, check_scale, check_softcap
from ..config import EntmaxKVConfig
from .sketch.reference import KeySketch
from .paged import check_paged_decode_inputs
from .stats.paged import PagedKVStats
from .stats.reference import KVPageStats
from .certify.policy import HostFallbackSchedule, dense_rows_for
from .graphed import GraphedStep
from .step import DecodeResult, implementation_for, run_step

__all__ = ["Decoder"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Decoder:
    """The planned decode step of one attention layer over a static KV cache.

    Args:
        config: the decode config (``None``: the defaults); alpha defaults to 1.5.
        batch, q_heads, kv_heads, head_dim: the shapes of ``q [B, Hq, 1, D]`` and of the caches
            ``[B, Hkv, capacity, D]`` (``Hq`` a multiple of ``Hkv``).
        capacity: the caches' ``Nmax`` (tokens per sequence they can hold).
        dtype, device: of q and the caches.
        scale: the score scale, default ``1/sqrt(D)``.
        softcap: the logit soft-cap, scores ``softcap * tanh(s / softcap)`` before entmax
            (Gemma-2 style); 0.0 (the default) = none. Not with the key sketch.
        alibi_slopes: optional float ``[Hq]`` on ``device``.
        stats: adopt these page statistics instead of allocating new ones (they must describe a
            cache of the planned shape with ``config.page_size``).
        sketch: adopt this int8 key sketch (``config.certify_sketch="int8"``) instead of
            allocating one; it must describe the same cache.
        cuda_graph: on a CUDA device, record ``run`` in a CUDA graph on its first call for a
            cache and replay it afterwards (results are copied out, so they stay valid across
            steps). Inside another capture ``run`` is recorded by that capture instead.
        num_blocks: plan a paged cache (``runtime/paged.py``): K and V are page pools
            ``[num_blocks, page_size, Hkv, D]`` and every ``prefill``/``append``/``run`` takes
            the step's ``block_table`` (int32 ``[batch, ceil(capacity / page_size)]``);
            ``capacity`` is then the tokens one sequence may hold. The statistics are kept per
            physical block (:class:`~entmaxkv_compile.runtime.stats.paged.PagedKVStats`). The
            table is a graph input like the lengths (``cuda_graph`` records the step once and
            copies each step's table in). No key sketch with a paged cache.
    """

    def __init__(
        self,
        config: EntmaxKVConfig | None = None,
        *,
        batch: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        scale: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
        stats: KVPageStats | None = None,
        sketch: KeySketch | None = None,
        cuda_graph: bool = True,
        softcap: float = 0.0,
        num_blocks: int | None = None,
    ) -> None:
        if config is None:
            config = EntmaxKVConfig()
        elif not isinstance(config, EntmaxKVConfig):
            raise TypeError(f"config must be an EntmaxKVConfig or None, got {type(config).__name__}")
        for name, value in (("batch", batch), ("q_heads", q_heads), ("kv_heads", kv_heads),
                            ("head_dim", head_dim), ("capacity", capacity)):
            _positive_int(name, value)
        if q_heads % kv_heads:
            raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
        device = torch.device(device)
        check_alibi_slopes(alibi_slopes, q_heads, device=device)
        self.config = config
        self.alpha = config.resolved_alpha(1.5)
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else check_scale(scale)
        self.alibi_slopes = alibi_slopes
        self.softcap = check_softcap(softcap)
        if self.softcap and config.keeps_sketch:
            raise ValueError(f"softcap={self.softcap}: the key sketch (certify_sketch={config.certify_sketch!r}) "
                             "does not bound soft-capped scores yet; use certify_sketch='off' for this site")
        self.q_shape = (batch, q_heads, 1, head_dim)
        self.cache_shape = (batch, kv_heads, capacity, head_dim)
        self.dtype, self.device = dtype, device
        self.impl = implementation_for(device, dtype)
        self.paged = num_blocks is not None
        if self.paged:
            _positive_int("num_blocks", num_blocks)
            if config.keeps_sketch:
                raise ValueError(f"num_blocks: the key sketch (certify_sketch={config.certify_sketch!r}) does not read "
                                 "a paged cache yet; use certify_sketch='off' with a block table")
            if sketch is not None:
                raise ValueError("num_blocks: a paged decoder takes no key sketch (sketch=None)")
            self.pool_shape = (num_blocks, config.page_size, kv_heads, head_dim)
            max_pages = -(-capacity // config.page_size)
            if stats is None:
                moments = dtype if config.moment_dtype == "cache" else None
                stats = PagedKVStats.allocate(num_blocks, kv_heads, head_dim, batch=batch, max_pages=max_pages,
                                              page_size=config.page_size, dtype=dtype, device=device,
                                              moment_dtype=moments)
            elif not isinstance(stats, PagedKVStats):
                raise TypeError(f"stats of a paged decoder must be a PagedKVStats or None, got {type(stats).__name__}")
            elif (stats.page_size, stats.batch, stats.max_pages) != (config.page_size, batch, max_pages) \
                    or tuple(stats.kmin.shape) != (num_blocks, kv_heads, head_dim):
                raise ValueError(f"stats (page_size {stats.page_size}, batch {stats.batch}, max_pages "
                                 f"{stats.max_pages}, blocks {tuple(stats.kmin.shape)}) must match the plan (page_size "
                                 f"{config.page_size}, batch {batch}, max_pages {max_pages}, blocks "
                                 f"{(num_blocks, kv_heads, head_dim)})")
        elif stats is None:
            moments = dtype if config.moment_dtype == "cache" else None
            stats = KVPageStats.allocate(batch, kv_heads, capacity, head_dim, page_size=config.page_size,
                                         dtype=dtype, device=device, moment_dtype=moments)
        elif not isinstance(stats, KVPageStats):
            raise TypeError(f"stats must be a KVPageStats or None, got {type(stats).__name__}")
        elif stats.page_size != config.page_size:
            raise ValueError(f"stats.page_size ({stats.page_size}) must equal config.page_size "
                             f"({config.page_size})")
        else:
            stats.check_cache(torch.empty(self.cache_shape, dtype=dtype, device="meta"))
        self.stats = stats
        self.sketch = None if self.paged else self._plan_sketch(sketch)
        graphed = cuda_graph and device.type == "cuda"
        self._graphed = GraphedStep(self._step, state=(stats.certify_skip,)) if graphed else None
        # certified + graphs: the host follows the fallback's period (certify/policy.py), so that a
        # step every sequence reads densely replays the dense step's graph, which launches none of
        # the selection and bound kernels; it learns from copies of the counter that have landed
        certified = config.selector == "certified"
        self._schedule = HostFallbackSchedule(config.certify_probe_every) if graphed and certified else None
        self._host_skip = torch.zeros(batch, dtype=torch.int32).pin_memory() if self._schedule else None
        self._host_copied = torch.cuda.Event() if self._schedule else None
        self._copy_pending = False

    def _plan_sketch(self, sketch: KeySketch | None) -> KeySketch | None:
        """The int8 key sketch of ``config.keeps_sketch``: the certified step selects its pages
        with it; an approximate selector that reports its bound takes it token by token."""
        wanted = self.config.keeps_sketch
        if sketch is None:
            if not wanted:
                return None
            batch, kv_heads, capacity, head_dim = self.cache_shape
            return KeySketch.allocate(batch, kv_heads, capacity, head_dim, dtype=self.dtype, device=self.device)
        if not isinstance(sketch, KeySketch):
            raise TypeError(f"sketch must be a KeySketch or None, got {type(sketch).__name__}")
        if not wanted:
            raise ValueError("sketch is used only with certify_sketch='int8' by the certified selector, or by "
                             "gaussian/topk with report_bound=True")
        sketch.check_cache(torch.empty(self.cache_shape, dtype=self.dtype, device=self.device))
        return sketch

    @classmethod
    def for_cache(cls, k_cache: torch.Tensor, q_heads: int, config: EntmaxKVConfig | None = None,
                  **kwargs: Any) -> "Decoder":
        """A decoder planned for ``k_cache [B, Hkv, Nmax, D]`` and ``q_heads`` query heads."""
        batch, kv_heads, capacity, head_dim = k_cache.shape
        return cls(config, batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                   capacity=capacity, dtype=k_cache.dtype, device=k_cache.device, **kwargs)

    def check(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              seqlens: torch.Tensor, *, check_values: bool = True, block_table: torch.Tensor | None = None) -> None:
        """Validate one step's inputs against the plan (``check_values`` also checks values,
        which synchronises). :meth:`run` does not call this: it trusts its caller. A paged
        decoder takes pools and the step's ``block_table``."""
        if self.paged or block_table is not None:
            self._check_paged(q, k_cache, v_cache, seqlens, block_table)
            return
        check_decode_inputs(q, k_cache, v_cache, seqlens, self.alibi_slopes, check_values=check_values)
        if tuple(q.shape) != self.q_shape or tuple(k_cache.shape) != self.cache_shape:
            raise ValueError(f"this decoder is planned for q {self.q_shape} and caches {self.cache_shape}, "
                             f"got q {tuple(q.shape)} and caches {tuple(k_cache.shape)}")
        if q.dtype != self.dtype or q.device != self.device:
            raise ValueError(f"this decoder is planned for {self.dtype} on {self.device}, got {q.dtype} "
                             f"on {q.device}")

    def _check_paged(self, q, k_pool, v_pool, seqlens, block_table) -> None:
        self._table(block_table)
        check_paged_decode_inputs(q, k_pool, v_pool, seqlens, block_table, page_size=self.config.page_size)
        if tuple(q.shape) != self.q_shape or tuple(k_pool.shape) != self.pool_shape:
            raise ValueError(f"this decoder is planned for q {self.q_shape} and pools {self.pool_shape}, "
                             f"got q {tuple(q.shape)} and pools {tuple(k_pool.shape)}")
        self.stats.check_pool(k_pool, block_table)

    def _table(self, block_table: torch.Tensor | None) -> torch.Tensor | None:
        """The step's table: required by a paged decoder, refused by a contiguous one."""
        if self.paged != (block_table is not None):
            planned = "paged" if self.paged else "contiguous; plan it with num_blocks= for a paged cache"
            raise ValueError(f"block_table: pass one exactly when the decoder is planned with num_blocks= "
                             f"(this one is {planned})")
        return block_table

    def prefill(self, k_cache: torch.Tensor, seqlens: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
        """Rebuild the page statistics (and the key sketch) from the first ``seqlens`` rows of
        ``k_cache`` (one pass); a paged decoder: of each row's blocks in ``block_table``."""
        if self._table(block_table) is not None:
            self.stats.prefill(k_cache, seqlens, block_table)
            return
        self.stats.prefill(k_cache, seqlens, check_values=False)
        if self.sketch is not None:
            self.sketch.prefill(k_cache, seqlens, check_values=False)

    def append(self, k_cache: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
        """Fold the rows just written at ``positions`` (int ``[B]``) into their pages; an append
        out of order marks that sequence's statistics invalid (never certified) on device. A
        paged decoder writes the block ``block_table[b, positions[b] // page_size]`` (never a
        shared one: copy on write, ``runtime/paged.py``)."""
        if self._table(block_table) is not None:
            self.stats.append(k_cache, positions, block_table)
            return
        self.stats.append(k_cache, positions, check_values=False)
        if self.sketch is not None:
            self.sketch.append(k_cache, positions, check_values=False)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            seqlens: torch.Tensor, row_start: torch.Tensor | None = None,
            block_table: torch.Tensor | None = None) -> DecodeResult:
        """One decode step over the first ``seqlens`` rows: no validation, no host sync.

        ``row_start`` (int ``[B]``, optional): each sequence attends ``[row_start, seqlens)`` only
        (a left-padded batch; see ``run_step``). Such a step runs eagerly: the recorded CUDA graphs
        take no start yet. ``block_table``: required by a paged decoder (``num_blocks=``), whose
        ``k_cache``/``v_cache`` are page pools."""
        paged = {} if self._table(block_table) is None else {"block_table": block_table}
        if row_start is not None or self._graphed is None:
            return self._step(q, k_cache, v_cache, seqlens, row_start=row_start, **paged)
        variant = self._variant()
        result = DecodeResult(*self._graphed(q, k_cache, v_cache, seqlens, variant, **paged))
        if variant == "step" and self._schedule is not None and not self._copy_pending:
            # news for the schedule, read once it has landed (never waited for)
            self._host_skip.copy_(self.stats.certify_skip, non_blocking=True)
            self._host_copied.record()
            self._copy_pending = True
        return result

    def _variant(self) -> str:
        """``"dense"`` on the steps where every sequence's fallback is expected to run: the
        certified step then equals the dense step (exact, no selection, no bounds, bit for bit
        the same results), and replaying that step's own graph skips the launches the device-side
        choice pays (:class:`~entmaxkv_compile.runtime.certify.policy.HostFallbackSchedule`)."""
        if self._schedule is None:
            return "step"
        if self._copy_pending and self._host_copied.query():
            self._schedule.learn(self._host_skip.tolist())
            self._copy_pending = False
        return self._schedule.choose()

    def _step(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              seqlens: torch.Tensor, variant: str = "step", row_start: torch.Tensor | None = None,
              block_table: torch.Tensor | None = None) -> DecodeResult:
        if variant == "dense":
            return self._dense_step(q, k_cache, v_cache, seqlens, block_table)
        certified = self.config.selector == "certified"
        dense_rows = dense_rows_for(self.stats.certify_skip) if certified else None
        # Only the certificate reads the statistics' order state (5 small launches otherwise).
        wants_order = certified or self.config.report_bound
        result = run_step(self.impl, q, k_cache, v_cache, seqlens, self.stats.buffers(), self.config,
                          alpha=self.alpha, scale=self.scale, alibi_slopes=self.alibi_slopes,
                          softcap=self.softcap, row_start=row_start, block_table=block_table,
                          stats_valid=self.stats.valid_for(seqlens) if wants_order else None,
                          dense_rows=dense_rows,
                          sketch=None if self.sketch is None else self.sketch.buffers())
        if certified:
            self._advance_policy(dense_rows, result.num_selected, seqlens)
        return result

    def _advance_policy(self, dense_rows: torch.Tensor, num_selected: torch.Tensor, seqlens: torch.Tensor) -> None:
        """Count the read-everything fallback on after a certified step (``certify/policy.py``)."""
        self.impl.certify_policy_update_(
            self.stats.certify_skip, dense_rows, num_selected, seqlens, page_size=self.config.page_size,
            num_pages=self.stats.num_pages, dense_above=self.config.certify_dense_above,
            probe_every=self.config.certify_probe_every)

    def _dense_step(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    seqlens: torch.Tensor, block_table: torch.Tensor | None = None) -> DecodeResult:
        """The certified step of sequences that all read every page: the dense step, with the
        certified mode's certificate (sound inputs, finite tau) and its counter counted down."""
        stats_ok = self.stats.valid_for(seqlens)
        result = run_step(self.impl, q, k_cache, v_cache, seqlens, self.stats.buffers(),
                          self.config.replace(selector="dense"), alpha=self.alpha, scale=self.scale,
                          alibi_slopes=self.alibi_slopes, stats_valid=stats_ok, softcap=self.softcap,
                          block_table=block_table)
        capacity = self.stats.num_pages * self.config.page_size
        certified, delta = self.impl.certified_heads(result.tau, torch.ones_like(result.certified), seqlens,
                                                     stats_ok, capacity=capacity)
        self._advance_policy(torch.ones_like(stats_ok), result.num_selected, seqlens)
        return result._replace(certified=certified, delta_bound=delta)
