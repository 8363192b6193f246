"""Context parallel decode: the KV cache's sequence sharded over ranks, the exact global entmax.

Layout: rank ``r`` of ``W`` owns the contiguous global positions ``[r*C, (r+1)*C)`` of every
sequence, ``C`` = the capacity split evenly and rounded up to whole pages, in its own
``k_cache``/``v_cache [B, Hkv, C, D]`` and its own :class:`KVPageStats`. Contiguous ranges rather
than round-robin pages because (a) a decode step appends one row, which then lands on one rank
and updates one page there, with no cross-rank page bookkeeping; (b) a page never straddles two
ranks, so each rank's statistics, selection and certificate are exactly the single-GPU ones over
its range; (c) a rank's tokens are one slab, so the local step is the single-GPU step at a
shorter length. The cost is load balance while a sequence grows: the ranks past the current
length hold nothing and idle, and a batch of ragged lengths gives the low ranks more tokens
(round-robin pages would balance every step at the price of every append's owner changing each
page). At the lengths where context parallelism pays (the cache no longer fits one GPU) the
ranks are full but the last, so the imbalance is at most one rank's worth.

One decode step (:meth:`ContextParallelDecoder.run`), every rank with the same ``q`` and global
lengths:

1. local selection with the configured selector on the rank's own statistics (the
   implementation's ``select_pages``: the Triton kernels on a GPU, the references elsewhere). The
   selectors' per-rank view: ``topk`` keeps ``token_budget`` tokens *per rank*; ``gaussian``
   estimates the threshold from the rank's pages (on a stationary sequence fewer tokens give a
   lower estimate, so it keeps more than the whole sequence's estimate would; a rank whose scores
   run higher than the rest estimates higher and keeps less); every rank keeps its last valid page;
   the sink
   pages are the sequence's first pages (on the ranks that hold them); ``min_context`` compares
   the global length;
2. local scores of the selected tokens and the exact *global* threshold. Where the
   implementation is the Triton kernels (a GPU) the rank runs the single-GPU K pass and its local
   exact threshold, and the global one comes from one ``all_reduce(MAX)`` of the local thresholds
   and one ``all_gather`` of the few scores above their max (``local_kernels.py``); elsewhere
   (gloo, float64, or a head with too many such scores) from power-sum levels over every local
   score (``global_tau.py``): one ``all_reduce(MAX)``, ``levels`` ``all_reduce(SUM)`` of per-bin
   power sums, one ``all_gather`` of the few scores next to the threshold;
3. the output: one ``all_reduce(SUM)`` of ``sum p v`` and ``sum p`` (the certificate flags ride
   along in the same tensor).

``certified`` mode runs one single-GPU certified round (the proof needs one;
``certify_max_rounds`` is not used here) with ranks: gaussian selection, the global
threshold ``tau0``, every rank adds its own pages whose Quest bound violates ``tau0``, the global
threshold of that selection and the output. Every page left out on any rank then has
``(alpha-1) u_p <= tau0 <= tau``, so the output is full entmax; the certificate is the AND over
the ranks of their flags (sound statistics, finite bounds) and holds only where the solve was
exact. Collectives per step, whatever the sequence length: 3 on the kernel path (5 certified),
the largest the gather of ``W*B*Hq*(kernel_cap+1)`` floats; ``levels + 3`` (``2*levels + 5``
certified) on the pure-torch path, the largest the levels' power sums,
``B*Hq*(bins+1)*(beta+1)`` float64 each (197 KiB for 32 heads, 256 bins, alpha 1.5).

The new token's K/V is written by the rank that owns its position (:meth:`append`). The step is
fixed-shape; the kernel path reads the gathered counts on the host once per solve (to gather a
crowded head again or fall back), except inside a CUDA-graph capture, where it reads nothing and
reports such a head not exact. The pure-torch path (one dense masked pass over the rank's cache
rows) is free of host syncs and runs on gloo (CPU) and NCCL (GPU) alike. ALiBi and the int8 key
sketch are not supported here.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..checks import check_decode_query, check_int_arg, check_kv_cache, check_positions, check_scale, check_seqlens
from ..config import EntmaxKVConfig
from ..runtime.select.reference import compute_dtype, page_mask_from_indices, selected_token_mask
from ..runtime.stats.reference import KVPageStats, append_in_order, stats_append_
from ..runtime.step import DecodeResult, implementation_for
from .cache_shard import local_capacity_for
from .collectives import Collectives
from .global_tau import GlobalThreshold, TauSettings, combine_output, global_threshold
from .local_kernels import KernelThreshold, kernel_output, kernel_threshold

__all__ = ["ContextParallelDecoder"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ContextParallelDecoder:
    """The decode step of one attention layer whose KV cache is sharded over the ranks of ``group``.

    Args:
        config: the decode config (``None``: the defaults; alpha defaults to 1.5).
        group: the process group (None: the default group; one process without
            ``init_process_group``).
        batch, q_heads, kv_heads, head_dim: the shapes of ``q [B, Hq, 1, D]`` (the same on every
            rank) and of the caches.
        capacity: the global number of tokens per sequence the sharded cache must hold.
        dtype, device: of q and this rank's cache shard.
        scale: the score scale, default ``1/sqrt(D)``.
        tau: how the global threshold is searched (:class:`TauSettings`).
        implementation: the stage implementation of the local selection and bounds
            (``runtime.step.reference_implementation()`` or the kernels); default
            ``implementation_for(device, dtype)``.
    """

    def __init__(self, config: EntmaxKVConfig | None = None, *, group: Optional[Any] = None, batch: int,
                 q_heads: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, scale: float | None = None, tau: TauSettings = TauSettings(),
                 implementation: Any = None) -> None:
        config = _checked_config(config)
        for name, value in (("batch", batch), ("q_heads", q_heads), ("kv_heads", kv_heads),
                            ("head_dim", head_dim), ("capacity", capacity)):
            check_int_arg(name, value, minimum=1)
        if q_heads % kv_heads:
            raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
        comm = Collectives(group)
        page = config.page_size
        local_capacity = local_capacity_for(capacity, page, comm.world_size)
        device = torch.device(device)
        shape = (batch, kv_heads, local_capacity, head_dim)
        moments = dtype if config.moment_dtype == "cache" else None
        stats = KVPageStats.allocate(batch, kv_heads, local_capacity, head_dim, page_size=page, dtype=dtype,
                                     device=device, moment_dtype=moments)
        self._plan(config, comm, tau, torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device), stats, q_heads, scale, implementation)

    @classmethod
    def over_buffers(cls, config: EntmaxKVConfig | None = None, *, group: Optional[Any] = None, q_heads: int,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, stats: KVPageStats, scale: float | None = None,
                     tau: TauSettings = TauSettings(), implementation: Any = None,
                     communicate: bool = True) -> "ContextParallelDecoder":
        """A decoder over buffers that already exist: this rank's cache shard ``k_cache``/``v_cache
        [B, Hkv, C, D]`` (C, the local capacity, a whole number of pages) and its statistics
        ``stats``; nothing is allocated or copied, and later steps read and write these very
        tensors (the compiled backend's op builds one per step over the model's own buffers).
        Rank ``r`` of the group then owns the global positions ``[r*C, (r+1)*C)``.
        ``communicate=False``: the step over this shard alone, as rank 0 of one (no collective:
        the backend runs it once at compile time so the kernels are warm)."""
        config = _checked_config(config)
        check_kv_cache("k_cache", k_cache)
        if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape or \
                v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
            raise ValueError(f"v_cache must be a tensor like k_cache ({k_cache.dtype} {tuple(k_cache.shape)} on "
                             f"{k_cache.device}), got {v_cache.dtype if isinstance(v_cache, torch.Tensor) else v_cache!r}")
        if k_cache.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"k_cache's dtype must be one of {_FLOAT_DTYPES}, got {k_cache.dtype!r}")
        check_int_arg("q_heads", q_heads, minimum=1)
        if q_heads % k_cache.shape[1]:
            raise ValueError(f"q_heads ({q_heads}) must be a multiple of the caches' kv_heads ({k_cache.shape[1]})")
        if k_cache.shape[2] % config.page_size:
            raise ValueError(f"the caches' length ({k_cache.shape[2]}) must be a whole number of pages of "
                             f"page_size {config.page_size} (every rank owns whole pages)")
        if not isinstance(stats, KVPageStats) or stats.page_size != config.page_size:
            raise ValueError(f"stats must be the KVPageStats of k_cache with page_size {config.page_size}, got "
                             f"{getattr(stats, 'page_size', type(stats).__name__)!r}")
        stats.check_cache(k_cache)
        decoder = cls.__new__(cls)
        comm = Collectives(group) if communicate else Collectives.local()
        decoder._plan(config, comm, tau, k_cache, v_cache, stats, q_heads, scale, implementation)
        return decoder

    def _plan(self, config: EntmaxKVConfig, comm: Collectives, tau: TauSettings, k_cache: torch.Tensor,
              v_cache: torch.Tensor, stats: KVPageStats, q_heads: int, scale: float | None, implementation: Any) -> None:
        """Set up the step over this rank's (validated) shard and statistics."""
        if not isinstance(tau, TauSettings):
            raise TypeError(f"tau must be a TauSettings, got {type(tau).__name__}")
        self.tau_settings = tau.validated()
        self.comm = comm
        self.config = config
        self.alpha = config.resolved_alpha(1.5)
        batch, _, local_capacity, head_dim = k_cache.shape
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else check_scale(scale)
        self.device = k_cache.device
        self.dtype = k_cache.dtype
        page = config.page_size
        world, rank = comm.world_size, comm.rank
        self.local_capacity = local_capacity
        self.start = rank * local_capacity
        self.capacity = world * local_capacity
        self.q_shape = (batch, q_heads, 1, head_dim)
        self.k_cache, self.v_cache, self.stats = k_cache, v_cache, stats
        self.impl = implementation_for(self.device, self.dtype) if implementation is None else implementation
        # the decode kernels in parts (runtime/attend/partial.py) where the implementation has them
        self.kernel_path = hasattr(self.impl, "local_candidates")
        self.fallbacks = 0  # solves the kernel path handed to the pure-torch levels (overflow)
        local_pages = local_capacity // page
        self._local_config = config.replace(
            selector="gaussian" if config.selector == "certified" else config.selector, min_context=0,
            sink_pages=max(0, min(local_pages, config.sink_pages - rank * local_pages)))

    # --- the cache shard ------------------------------------------------------------------------

    def local_lengths(self, seqlens: torch.Tensor) -> torch.Tensor:
        """int64 ``[B]``: how many of each sequence's first ``seqlens`` tokens this rank holds."""
        return (seqlens.to(torch.int64) - self.start).clamp(0, self.local_capacity)

    def load(self, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor) -> None:
        """Copy this rank's range of the global ``k, v [B, Hkv, T, D]`` (``T <= capacity``) into
        the shard and rebuild its statistics for the global lengths ``seqlens``."""
        if k.shape != v.shape or tuple(k.shape[:2]) != tuple(self.k_cache.shape[:2]) or \
                k.shape[3] != self.k_cache.shape[3] or k.shape[2] > self.capacity:
            raise ValueError(f"k and v must both be [B, Hkv, T, D] = [{self.k_cache.shape[0]}, "
                             f"{self.k_cache.shape[1]}, <= {self.capacity}, {self.k_cache.shape[3]}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        rows = k[:, :, self.start:self.start + self.local_capacity]
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.k_cache[:, :, :rows.shape[2]] = rows
        self.v_cache[:, :, :rows.shape[2]] = v[:, :, self.start:self.start + self.local_capacity]
        self.prefill(seqlens)

    def prefill(self, seqlens: torch.Tensor) -> None:
        """Rebuild this rank's statistics from its shard, as it holds the first ``seqlens``
        (global) tokens of each sequence (after the caller wrote ``k_cache`` directly)."""
        self.stats.prefill(self.k_cache, self.local_lengths(seqlens), check_values=False)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Write the new token's ``k_new, v_new [B, Hkv, 1, D]`` at the global ``positions [B]``
        on the rank that owns each position (the others keep their shard) and fold it into that
        rank's page statistics; an append out of order clears the sequence's ``valid`` flag on
        the owning rank (never certified again until a prefill). Every rank calls it; no sync."""
        batch, kv_heads, _, head_dim = self.k_cache.shape
        local = positions.to(torch.int64) - self.start
        owned = (local >= 0) & (local < self.local_capacity)
        index = local.clamp(0, self.local_capacity - 1).view(batch, 1, 1, 1).expand(batch, kv_heads, 1, head_dim)
        keep = owned.view(batch, 1, 1, 1)
        for cache, new in ((self.k_cache, k_new), (self.v_cache, v_new)):
            cache.scatter_(2, index, torch.where(keep, new.to(cache.dtype), cache.gather(2, index)))
        stats_append_(self.k_cache, torch.where(owned, local, -1), self.stats.page_size, *self.stats.buffers())
        in_order = append_in_order(local, self.stats.last_position, self.stats.page_size, self.local_capacity)
        self.stats.valid.logical_and_(in_order | ~owned)
        self.stats.last_position.copy_(torch.where(owned, local, self.stats.last_position))

    def check(self, q: torch.Tensor, seqlens: torch.Tensor, k_new: torch.Tensor | None = None,
              v_new: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        """Validate one step's inputs against the plan (their values too, which synchronises):
        ``q`` and the global ``seqlens`` of :meth:`run`, optionally ``k_new``/``v_new``/``positions``
        of :meth:`append`. :meth:`run` and :meth:`append` do not call this: they trust their caller."""
        check_decode_query(q)
        if tuple(q.shape) != self.q_shape or q.dtype != self.dtype or q.device != self.device:
            raise ValueError(f"q must be {self.dtype} {self.q_shape} on {self.device}, got {q.dtype} "
                             f"{tuple(q.shape)} on {q.device}")
        check_seqlens(seqlens, self.q_shape[0], self.capacity, device=self.device)
        if positions is not None:
            check_positions(positions, self.q_shape[0], self.capacity, device=self.device)
            row = (self.q_shape[0], self.k_cache.shape[1], 1, self.q_shape[3])
            for name, new in (("k_new", k_new), ("v_new", v_new)):
                if not isinstance(new, torch.Tensor) or tuple(new.shape) != row or new.device != self.device:
                    raise ValueError(f"{name} must be a tensor {row} on {self.device}, got "
                                     f"{tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__}")

    # --- one decode step ------------------------------------------------------------------------

    def run(self, q: torch.Tensor, seqlens: torch.Tensor) -> DecodeResult:
        """One decode step of ``q [B, Hq, 1, D]`` over the first ``seqlens [B]`` (global) tokens.

        Returns the :class:`DecodeResult` of the whole sequence: ``out``, ``certified``,
        ``delta_bound`` and ``tau`` are global (identical on every rank); ``page_indices`` and
        ``num_selected`` are this rank's (local page ids of its shard).
        """
        config = self.config
        lengths = self.local_lengths(seqlens)
        geometry = dict(page_size=config.page_size, alpha=self.alpha, scale=self.scale, alibi_slopes=None)
        pages = self._select(q, lengths, seqlens)
        solved = self._threshold(q, pages, lengths)
        if config.selector == "certified" or config.report_bound:
            stats_ok = self.stats.valid_for(lengths) | (lengths == 0)
        if config.selector == "certified":
            kmin, kmax = self.stats.kmin, self.stats.kmax
            read_all = ~stats_ok
            first = self._heads(solved.lower)
            pages[0], pages[1], finite = self.impl.certify_pages(q, kmin, kmax, lengths, *pages, first, read_all,
                                                                 **geometry)
            solved = self._threshold(q, pages, lengths)
            trusted = finite & stats_ok[:, None]
            tau_floor = torch.maximum(self._heads(solved.tau), first)
            out, flags = self._output(solved, (~trusted).to(torch.float32)[..., None])
            certified = (flags[..., 0] == 0) & self._heads(solved.exact) & torch.isfinite(tau_floor)
            certified = certified & self._sound(seqlens)[:, None]
            delta = torch.where(certified, 0.0, 1.0)
        elif config.selector == "dense":
            out, _ = self._output(solved)
            certified = self._heads(solved.exact) & torch.isfinite(self._heads(solved.tau))
            delta = torch.where(certified, 0.0, 1.0)
        elif config.report_bound:
            ok, delta_r = self.impl.certify(q, self.stats.kmin, self.stats.kmax, lengths, *pages,
                                            self._heads(solved.lower), stats_valid=stats_ok, **geometry)
            empty = (lengths == 0)[:, None]
            ok, delta_r = ok | empty, torch.where(empty, 0.0, delta_r)
            out, flags = self._output(solved, torch.stack([(~ok).to(torch.float32), delta_r.to(torch.float32)], -1))
            certified = (flags[..., 0] == 0) & self._heads(solved.exact) & self._sound(seqlens)[:, None]
            delta = torch.where(self._heads(solved.exact), flags[..., 1].clamp(max=1.0), 1.0)
            delta = torch.where(certified, 0.0, delta)
        else:
            out, _ = self._output(solved)
            certified = torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)
            delta = torch.ones(q.shape[:2], device=q.device)
        tau = self._heads(solved.tau).to(torch.float32)
        return DecodeResult(out.to(q.dtype), pages[0], pages[1], certified, delta.to(torch.float32), tau)

    def collective_calls(self) -> tuple[int, int]:
        """``(calls, bytes sent by this rank)`` of the collectives so far (benchmark accounting)."""
        return self.comm.calls, self.comm.bytes

    def _select(self, q: torch.Tensor, lengths: torch.Tensor, seqlens: torch.Tensor) -> list[torch.Tensor]:
        """``[page_indices, num_selected]`` of this rank's shard (a list: the certified round
        replaces both)."""
        c = self._local_config
        page_indices, num_selected = self.impl.select_pages(
            q, *self.stats.buffers(), lengths, selector=c.selector, token_budget=c.token_budget,
            max_quantile=c.max_quantile, margin=c.margin, tau_estimate=c.tau_estimate,
            sink_pages=c.sink_pages, recent_pages=c.recent_pages, min_context=0, page_size=c.page_size,
            alpha=self.alpha, scale=self.scale, alibi_slopes=None)
        if self.config.min_context > 0:  # short sequences read every page (judged by the global length)
            num_pages = self.stats.num_pages
            short = (seqlens.to(torch.int64) < self.config.min_context)[:, None, None]
            valid = (torch.arange(num_pages, device=q.device) * c.page_size < lengths[:, None])[:, None, :]
            mask = page_mask_from_indices(page_indices, num_selected, num_pages) | (short & valid)
            page_indices, num_selected = self.impl.compact_page_mask(mask)
        return [page_indices, num_selected]

    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, G, C]``: scaled scores of every local row, in the compute dtype."""
        dtype = compute_dtype(q)
        batch, q_heads, _, head_dim = q.shape
        kv_heads = self.k_cache.shape[1]
        qg = q.reshape(batch, kv_heads, q_heads // kv_heads, head_dim).to(dtype)
        return (qg @ self.k_cache.to(dtype).transpose(-1, -2)) * self.scale

    def _threshold(self, q: torch.Tensor, pages: list[torch.Tensor],
                   lengths: torch.Tensor) -> GlobalThreshold | KernelThreshold:
        """The exact global threshold of the selection: on the kernels from the local thresholds
        (``local_kernels.py``; one host read per solve) unless some head has more than
        ``kernel_max_cap`` scores to gather on some rank (every rank sees the same counts, so all
        take the same branch), else by power-sum levels over every local score (``global_tau.py``)."""
        if self.kernel_path:
            # Inside a CUDA graph capture there is no host read: an overflowed head stays marked
            # not exact (never certified) instead of being gathered again or falling back.
            capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            settings = self.tau_settings
            solved = kernel_threshold(self.comm, self.impl, q, self.k_cache, lengths, *pages,
                                      page_size=self.config.page_size, alpha=self.alpha, scale=self.scale,
                                      cap=settings.kernel_cap, max_cap=None if capturing else settings.kernel_max_cap)
            if capturing or not bool(solved.overflow.any()):
                return solved
            self.fallbacks += 1
        tokens = selected_token_mask(pages[0], pages[1], lengths, page_size=self.config.page_size,
                                     max_seqlen=self.local_capacity)
        return global_threshold(self.comm, self._scores(q), tokens[:, :, None, :], self.alpha, self.tau_settings)

    def _output(self, solved: GlobalThreshold | KernelThreshold, extra: torch.Tensor | None = None):
        """``(out [B, Hq, 1, D], extra [B, Hq, E] summed over ranks)``; ``extra`` is ``[B, Hq, E]``."""
        batch, kv_heads, group = solved.tau.shape
        if extra is not None:
            extra = extra.reshape(batch, kv_heads, group, -1)
        if isinstance(solved, KernelThreshold):
            out, extra = kernel_output(self.comm, self.impl, solved, self.v_cache, self.alpha, extra)
        else:
            out, extra = combine_output(self.comm, solved, self.v_cache, self.alpha, extra)
        out = out.reshape(batch, kv_heads * group, 1, -1)
        return out, (None if extra is None else extra.reshape(batch, kv_heads * group, -1))

    @staticmethod
    def _heads(t: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, G]`` -> ``[B, Hq]``."""
        return t.flatten(1)

    def _sound(self, seqlens: torch.Tensor) -> torch.Tensor:
        """bool ``[B]``: the global length lies in ``[1, capacity]``."""
        length = seqlens.to(torch.int64)
        return (length >= 1) & (length <= self.capacity)


def _checked_config(config: EntmaxKVConfig | None) -> EntmaxKVConfig:
    """The config (the defaults for None), refusing what context parallel decode does not shard."""
    config = EntmaxKVConfig() if config is None else config
    if not isinstance(config, EntmaxKVConfig):
        raise TypeError(f"config must be an EntmaxKVConfig or None, got {type(config).__name__}")
    if config.certify_sketch != "off":
        raise ValueError("certify_sketch must be 'off' for context parallel decode (the int8 sketch "
                         f"is not sharded), got {config.certify_sketch!r}")
    return config
