"""Decode-step benchmark, side by side in one run (GPU only).

Methods: torch SDPA with the flash backend (softmax, dense), our dense entmax decode, and the whole
top-k, gaussian and certified steps (page scoring + selection + fused decode [+ certificate]);
``gaussian`` reads float32 page moments, ``gaussian_c`` compact ones in the cache dtype.
Every method is captured in a CUDA graph and timed by ``triton.testing.do_bench`` (median).
Printed per row: ms, achieved GB/s on the bytes the method must move, selected page fraction and
the relative error versus exact full entmax (computed in fp32 on the GPU).

Usage: ``python benchmarks/decode.py --out results.json [--lengths 32768,131072] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entmaxkv_compile.math import reference  # noqa: E402
from entmaxkv_compile.runtime import kernels  # noqa: E402
from entmaxkv_compile.runtime.stats.reference import KVPageStats  # noqa: E402
from entmaxkv_compile.config import EntmaxKVConfig  # noqa: E402
from entmaxkv_compile.runtime.tuning import tuned  # noqa: E402
from entmaxkv_compile.runtime.step import run_step  # noqa: E402

PAGE = 16
ALPHA = 1.5
DEVICE = "cuda"


def make_data(batch, hq, hkv, n, dim, dtype, structured, seed=0):
    """q, K, V on the GPU. Structured: group-correlated queries, iid keys plus planted clusters
    of high-score keys covering ~1.5% of pages, so the entmax support is small."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = DEVICE
    base = torch.randn(batch, hkv, 1, 1, dim, generator=gen, device=dev)
    q = (base + 0.3 * torch.randn(batch, hkv, hq // hkv, 1, dim, generator=gen, device=dev))
    q = q.reshape(batch, hq, 1, dim)
    k = torch.randn(batch, hkv, n, dim, generator=gen, device=dev, dtype=dtype)
    v = torch.randn(batch, hkv, n, dim, generator=gen, device=dev, dtype=dtype)
    if structured:
        pages = n // PAGE
        planted = max(1, int(0.015 * pages))
        chosen = torch.randperm(pages, generator=gen, device=dev)[:planted]
        rows = (chosen[:, None] * PAGE + torch.arange(PAGE, device=dev)).flatten()
        direction = base[:, :, 0, 0]  # [B, Hkv, D]
        direction = 6.0 * math.sqrt(dim) * direction / (direction * direction).sum(-1, True)
        strength = torch.rand(rows.numel(), generator=gen, device=dev) * 0.5 + 0.75
        k[:, :, rows] += (direction[:, :, None, :] * strength[None, None, :, None]).to(dtype)
    return q.to(dtype), k, v


def exact_entmax(q, k, v, alpha, scale, chunk=1 << 16):
    """Exact full entmax decode in fp32 on the GPU, chunked over tokens (no [Hq, N, D] copy)."""
    batch, hq, _, dim = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.float().reshape(batch, hkv, g, dim)
    scores = torch.empty(batch, hkv, g, n, device=q.device)
    for s in range(0, n, chunk):
        scores[..., s:s + chunk] = qg @ k[:, :, s:s + chunk].float().transpose(-1, -2)
    scores = scores.reshape(batch, hq, n) * scale
    p = reference.entmax(scores, alpha=alpha, dim=-1).reshape(batch, hkv, g, n)
    out = torch.zeros(batch, hkv, g, dim, device=q.device)
    for s in range(0, n, chunk):
        out += p[..., s:s + chunk] @ v[:, :, s:s + chunk].float()
    support = (p > 0).reshape(batch, hkv, g, n).any(2)  # rows of V some head needs
    return out.reshape(batch, hq, 1, dim), support


def graphed(fn):
    """Capture ``fn`` in a CUDA graph after a warm-up; return the replay callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph.replay, result


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_breakdown(replay, label, repeats=20):
    """Per-kernel GPU time of a graphed step (torch.profiler), printed as a short table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            replay()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]
    text = ", ".join(f"{e.key[:28]}={e.device_time_total / repeats:.1f}us" for e in rows)
    print(f"  breakdown {label}: {text}", flush=True)
    return {e.key: e.device_time_total / repeats for e in rows}


def rel_err(out, ref):
    return float((out.float() - ref).norm() / ref.norm())


def run_case(batch, hq, hkv, n, dim, dtype, structured, budget_frac=0.03, breakdown=False,
             variants=None):
    scale = 1 / math.sqrt(dim)
    q, k, v = make_data(batch, hq, hkv, n, dim, dtype, structured)
    seqlens = torch.full((batch,), n, device=DEVICE, dtype=torch.int32)
    stats = KVPageStats.allocate(batch, hkv, n, dim, PAGE, dtype, DEVICE)
    kernels.stats_prefill_(k, seqlens, PAGE, *stats.buffers())
    compact = KVPageStats.allocate(batch, hkv, n, dim, PAGE, dtype, DEVICE, moment_dtype=dtype)
    kernels.stats_prefill_(k, seqlens, PAGE, *compact.buffers())
    ref, support = exact_entmax(q, k, v, ALPHA, scale)
    pages = n // PAGE
    esz = k.element_size()
    kv_bytes = 2 * batch * hkv * n * dim * esz
    k_bytes = kv_bytes // 2
    v_support = int(support.sum()) * dim * esz
    minmax_bytes = 2 * batch * hkv * pages * dim * esz
    moment_bytes = 2 * batch * hkv * pages * dim * 4
    compact_bytes = moment_bytes * esz // 4
    rows = []

    def record(name, ms, nbytes, frac, out):
        rows.append(dict(method=name, ms=ms, gbps=nbytes / ms / 1e6, bytes=nbytes,
                         selected=frac, rel_err=rel_err(out, ref) if out is not None else None))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != hq)
    replay, _ = graphed(sdpa)
    record("sdpa_flash", bench(replay), kv_bytes, 1.0, None)

    select_kw = dict(page_size=PAGE, alpha=ALPHA, scale=scale, max_quantile=0.99, margin=0.0,
                     tau_estimate="global", sink_pages=0, recent_pages=0, min_context=0)
    budget = max(PAGE, int(budget_frac * n) // PAGE * PAGE)

    def step(selector, buffers=None, overrides=None):
        buffers = stats.buffers() if buffers is None else buffers

        def fn():
            with contextlib.ExitStack() as stack:
                for family, params in (overrides or {}).items():
                    stack.enter_context(tuned.override(family, params))
                idx, nsel = kernels.select_pages(q, *buffers, seqlens, selector=selector,
                                                 token_budget=budget, **select_kw)
                out, _ = kernels.paged_decode(q, k, v, seqlens, idx, nsel, page_size=PAGE,
                                              alpha=ALPHA, scale=scale)
            return out, nsel
        return fn

    certified_cfg = EntmaxKVConfig(selector="certified", page_size=PAGE, alpha=ALPHA,
                                   tau_estimate="global", certify_max_rounds=1)

    def certified():
        res = run_step(kernels, q, k, v, seqlens, stats.buffers(), certified_cfg, alpha=ALPHA,
                       scale=scale)
        return res.out, res.num_selected

    all_idx = torch.arange(pages, device=DEVICE, dtype=torch.int32).repeat(batch, hkv, 1)
    all_n = torch.full((batch, hkv), pages, device=DEVICE, dtype=torch.int32)
    replay, (out, _) = graphed(lambda: kernels.paged_decode(
        q, k, v, seqlens, all_idx, all_n, page_size=PAGE, alpha=ALPHA, scale=scale))
    record("entmax_dense", bench(replay), k_bytes + v_support, 1.0, out)
    if breakdown:
        rows[-1]["breakdown"] = kernel_breakdown(replay, "entmax_dense")

    methods = [("topk", step("topk"), minmax_bytes),
               ("gaussian", step("gaussian"), moment_bytes),
               ("gaussian_c", step("gaussian", compact.buffers()), compact_bytes),
               ("certified", certified, moment_bytes + 2 * minmax_bytes)]
    for name, overrides in (variants or {}).items():  # launch-parameter variants, compact moments
        methods.insert(-1, (name, step("gaussian", compact.buffers(), overrides), compact_bytes))
    for name, fn, stat_bytes in methods:
        replay, (out, nsel) = graphed(fn)
        replay()
        torch.cuda.synchronize()
        frac = float(nsel.float().mean()) / pages
        sel_bytes = int(nsel.sum()) * PAGE * dim * esz
        record(name, bench(replay), stat_bytes + sel_bytes + v_support, frac, out)
        if breakdown and name.startswith(("gaussian", "topk")):
            rows[-1]["breakdown"] = kernel_breakdown(replay, name)
    return rows


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6


def parse_variants(specs):
    """``["name:family.KEY=VAL,..."]`` -> ``{name: {family: {KEY: int(VAL)}}}``."""
    variants = {}
    for spec in specs:
        name, _, body = spec.partition(":")
        overrides = {}
        for item in filter(None, body.split(",")):
            path, _, value = item.partition("=")
            family, _, key = path.partition(".")
            if not (family and key and value):
                raise SystemExit(f"bad --variant item {item!r} (want family.KEY=VAL)")
            overrides.setdefault(family, {})[key] = int(value)
        variants[name] = overrides
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("decode_results.json"))
    parser.add_argument("--lengths", default="32768,131072,524288,1048576")
    parser.add_argument("--configs", default="b1-gqa-fp16-structured,b1-gqa-fp16-random,"
                        "b1-mha-fp16-structured,b1-gqa-bf16-structured,b8-gqa-fp16-structured")
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop after this long")
    parser.add_argument("--breakdown", default="131072",
                        help="lengths at which to print per-kernel times")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:family.KEY=VAL[,family.KEY=VAL...]: also time the compact "
                             "gaussian step with these tuned-config overrides, e.g. "
                             "'c_dot:select.MOMENTS_DOT=1'")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                copy_gbps=copy_bandwidth(), page_size=PAGE, alpha=ALPHA, rows=[])
    print(f"{meta['device']} torch {meta['torch']} triton {meta['triton']} "
          f"copy {meta['copy_gbps']:.0f} GB/s", flush=True)
    for cfg in args.configs.split(","):
        b, heads, dt, data = cfg.split("-")
        batch = int(b[1:])
        hq, hkv = (32, 8) if heads == "gqa" else (8, 8)
        dtype = torch.float16 if dt == "fp16" else torch.bfloat16
        for n in (int(x) for x in args.lengths.split(",")):
            if time.time() - t0 > args.budget_s:
                print(f"time budget reached, skipping {cfg} N={n}", flush=True)
                continue
            if batch * hkv * n * 128 * 2 * 2 > 40e9:
                continue
            try:
                rows = run_case(batch, hq, hkv, n, 128, dtype, data == "structured",
                                breakdown=str(n) in args.breakdown.split(","),
                                variants=parse_variants(args.variant))
            except torch.OutOfMemoryError:
                print(f"OOM at {cfg} N={n}", flush=True)
                torch.cuda.empty_cache()
                continue
            torch.cuda.empty_cache()
            for r in rows:
                r.update(config=cfg, n=n)
                meta["rows"].append(r)
                err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
                print(f"{cfg:26s} N={n:8d} {r['method']:13s} {r['ms']:8.4f} ms "
                      f"{r['gbps']:7.0f} GB/s sel={r['selected']:.4f} err={err}", flush=True)
            args.out.write_text(json.dumps(meta, indent=1))
    args.out.write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
