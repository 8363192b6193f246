"""The whole decode step (write -> stats -> select -> decode) captured once in a CUDA graph and
replayed for 1000 steps while the cache grows past many page boundaries: equal to eager at every
step, and no Triton recompilation after warm-up. GPU only (run by benchmarks/gpu_check.py)."""

import math

import pytest
import torch

from entmaxkv_compile.runtime import kernels

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.available("cuda")),
    reason="needs a CUDA GPU: CUDA graphs cannot be captured on the CPU or the Triton interpreter",
)


def _compiled_variants() -> int:
    """How many compiled specializations the decode/select/stats kernels hold."""
    from entmaxkv_compile.runtime.attend import decode_kernels, tau_kernels
    from entmaxkv_compile.runtime.select import select_kernels, tau_hat
    from entmaxkv_compile.runtime.stats import kernel as page_stats

    fns = [decode_kernels.score_kernel, tau_kernels.tau_first_kernel, tau_kernels.tau_second_kernel,
           decode_kernels.output_kernel, decode_kernels.reduce_kernel, page_stats._append_kernel, select_kernels.moments_kernel,
           select_kernels.keep_kernel, select_kernels.compact_kernel, tau_hat.mixture_tau_kernel]
    return sum(len(entry[0]) for fn in fns for entry in fn.device_caches.values())


class _Step:
    """Static buffers of one decode layer and the step that updates them in place."""

    def __init__(self, batch, hq, hkv, nmax, dim, page, start, dtype, gen):
        dev = "cuda"
        self.page, self.dim = page, dim
        self.k = torch.randn(batch, hkv, nmax, dim, generator=gen, device=dev).to(dtype)
        self.v = torch.randn(batch, hkv, nmax, dim, generator=gen, device=dev).to(dtype)
        self.pos = start.clone()
        self.seqlens = start + 1
        from entmaxkv_compile.runtime.stats.reference import KVPageStats

        self.stats = KVPageStats.allocate(batch, hkv, nmax, dim, page, dtype, dev)
        kernels.stats_prefill_(self.k, self.seqlens, page, *self.stats.buffers())
        self.q = torch.empty(batch, hq, 1, dim, device=dev, dtype=dtype)
        self.k_new = torch.empty(batch, hkv, 1, dim, device=dev, dtype=dtype)
        self.v_new = torch.empty_like(self.k_new)
        self.out = torch.empty_like(self.q)

    def load(self, q, k_new, v_new):
        self.q.copy_(q)
        self.k_new.copy_(k_new)
        self.v_new.copy_(v_new)

    def __call__(self):
        batch, hkv, _, dim = self.k.shape
        rows = self.pos.view(batch, 1, 1, 1).expand(batch, hkv, 1, dim)
        self.k.scatter_(2, rows, self.k_new)
        self.v.scatter_(2, rows, self.v_new)
        kernels.stats_append_(self.k, self.pos, self.page, *self.stats.buffers())
        self.seqlens.copy_(self.pos + 1)
        idx, nsel = kernels.select_pages(
            self.q, *self.stats.buffers(), self.seqlens, page_size=self.page, alpha=1.5,
            scale=1 / math.sqrt(dim), selector="gaussian", token_budget=256, max_quantile=0.99,
            margin=0.0, tau_estimate="global", sink_pages=1, recent_pages=1, min_context=0)
        out, _ = kernels.paged_decode(self.q, self.k, self.v, self.seqlens, idx, nsel,
                                      page_size=self.page, alpha=1.5, scale=1 / math.sqrt(dim))
        self.out.copy_(out)
        self.pos.add_(1)


def test_graph_replay_equals_eager_while_cache_grows():
    batch, hq, hkv, nmax, dim, page, steps = 2, 32, 8, 4096, 128, 16, 1000
    start = torch.tensor([1000, 1517], device="cuda", dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(0)
    graphed = _Step(batch, hq, hkv, nmax, dim, page, start, torch.float16, gen)
    eager = _Step(batch, hq, hkv, nmax, dim, page, start, torch.float16,
                  torch.Generator(device="cuda").manual_seed(0))
    inputs = torch.Generator(device="cuda").manual_seed(1)

    def draw():
        return (torch.randn(batch, hq, 1, dim, generator=inputs, device="cuda").half(),
                torch.randn(batch, hkv, 1, dim, generator=inputs, device="cuda").half(),
                torch.randn(batch, hkv, 1, dim, generator=inputs, device="cuda").half())

    warm = 3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warm):  # warm-up compiles every kernel variant
            x = draw()
            graphed.load(*x)
            graphed()
            eager.load(*x)
            eager()
    torch.cuda.current_stream().wait_stream(stream)
    variants = _compiled_variants()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed()
    for step in range(steps):
        x = draw()
        graphed.load(*x)
        graph.replay()
        eager.load(*x)
        eager()
        assert torch.equal(graphed.out, eager.out), f"graph and eager differ at step {step}"
    assert torch.equal(graphed.pos, start + warm + steps)
    assert torch.equal(graphed.stats.kmean, eager.stats.kmean)
    assert _compiled_variants() == variants, "a kernel recompiled as the cache grew"
