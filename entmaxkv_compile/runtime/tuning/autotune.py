"""``entmaxkv-compile autotune``: measure launch configs on the current GPU and write its JSON.

Tuning happens here, offline, never on the hot path: for each shape class (dtype, head dim, GQA
group, page size) and each of ``--lengths`` every candidate config of the fused decode (tiles,
warps, stages and the grid's programs per SM) is timed on a dense decode over that many tokens
(``triton.testing.do_bench`` median, CUDA graph replay), then the latency-bound kernels' warps
and tiles (``LATENCY_SPACE``: the threshold levels, the V pass) are descended one parameter at a
time from the best, and the fastest is stored under the class
and its length bucket in ``runtime/tuning/configs/<gpu>.json`` (or ``--out-dir``), which
``tuned.lookup`` reads at run time; other kernel families already in the file are kept (the
selection kernels are set from ``benchmarks/sweep_launch.py``). A last stage tunes the
``-sparse`` entry of each bucket (``SPARSE_SPACE``, descended from the bucket's best) on a decode
that reads one page in ``SPARSE_STRIDE``, as a selection does: its threshold and V passes see a
few pages' candidates whatever the capacity.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from . import tuned

DECODE_SPACE = {"BLOCK_N": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3),
                "BLOCK_T": (32, 64), "PROGRAMS_PER_SM": (2, 4, 8)}
QUICK_SPACE = {"BLOCK_N": (64, 128), "num_warps": (4,), "num_stages": (2,), "BLOCK_T": (32,),
               "PROGRAMS_PER_SM": (2, 4, 8)}
# Second stage, one parameter at a time from the first stage's best: the threshold levels and the
# V pass are latency-bound on few candidates, so their warps and tiles matter more at short lengths.
LATENCY_SPACE = {"tau_warps": (1, 2, 4), "BLOCK_TAU": (32, 64, 128), "out_warps": (2, 4, 8)}
# Third stage: a sparse decode (one page in SPARSE_STRIDE selected, about what a gaussian selection
# keeps on planted spans) descends these from the bucket's best into its "-sparse" entry.
SPARSE_SPACE = {"MIN_SPLIT_PAGES": (1, 4, 8, 16), **LATENCY_SPACE, "BLOCK_T": (32, 64)}
SPARSE_STRIDE = 50
SHAPE_CLASSES = ((torch.float16, 128, 4), (torch.bfloat16, 128, 4), (torch.float16, 128, 1),
                 (torch.bfloat16, 128, 1))
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _time_decode(dtype: torch.dtype, dim: int, group: int, page: int, length: int,
                 params: dict[str, int], stride: int = 1) -> float:
    """Median ms of a CUDA-graphed decode with ``params`` (inf when it fails to run) over every
    ``stride``-th page (1: a dense decode, read with the dense entries; else the sparse ones)."""
    import triton.testing

    from ..attend.kernel import paged_decode

    kv_heads = 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, kv_heads * group, 1, dim, device="cuda", generator=gen).to(dtype)
    k = torch.randn(1, kv_heads, length, dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn_like(k)
    seqlens = torch.full((1,), length, device="cuda", dtype=torch.int32)
    pages = length // page
    chosen = torch.arange(0, pages, stride, device="cuda", dtype=torch.int32)
    idx = torch.full((1, kv_heads, pages), -1, device="cuda", dtype=torch.int32)
    idx[:, :, :chosen.numel()] = chosen
    nsel = torch.full((1, kv_heads), chosen.numel(), device="cuda", dtype=torch.int32)

    def step():
        return paged_decode(q, k, v, seqlens, idx, nsel, page_size=page, alpha=1.5,
                            scale=1 / math.sqrt(dim), read_all=stride == 1)

    with tuned.override("paged_decode", params):
        try:
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        except Exception:  # a config the compiler rejects (e.g. out of shared memory)
            return float("inf")
    return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")


def _config_keys(dtype: torch.dtype, dim: int, group: int, page: int, length: int,
                 lengths: list[int]) -> list[str]:
    """The config entries a timing at ``length`` tunes: its class's length bucket, and the
    bucket-free class entry for the last of ``lengths``."""
    shape_key = tuned.shape_class(dtype, dim, group, page)
    return [f"{shape_key}-{tuned.length_bucket(length)}"] + ([shape_key] if length == lengths[-1] else [])


def autotune_main(argv: Sequence[str] | None = None) -> int:
    """Tune the fused decode for the current GPU and write its config file. Returns an exit
    code: 0 on success, 2 without a CUDA GPU."""
    parser = argparse.ArgumentParser(prog="entmaxkv-compile autotune",
                                     description="tune Triton launch configs for this GPU")
    parser.add_argument("--out-dir", type=Path, default=tuned.CONFIG_DIR,
                        help="where to write <gpu>.json (default: the package's configs)")
    parser.add_argument("--lengths", default="32768,131072,1048576",
                        help="comma list of timed cache lengths (tokens); each tunes its length bucket "
                             "(<= 64k, <= 512k, longer) and the last one also the bucket-free entry")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default 16)")
    parser.add_argument("--quick", action="store_true", help="a smaller search space")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not torch.cuda.is_available():
        print("autotune needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be a comma list of ints, got {args.lengths!r}")
    if any(n < args.page_size or n % args.page_size for n in lengths):
        parser.error("every --lengths entry must be a positive multiple of --page-size")
    import triton

    space = QUICK_SPACE if args.quick else DECODE_SPACE
    candidates = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    total = len(candidates) * len(SHAPE_CLASSES) * len(lengths)
    best: dict[str, dict[str, int]] = {}
    timings: dict[str, float] = {}
    trials = tqdm(itertools.product(lengths, SHAPE_CLASSES, candidates), total=total, unit="config",
                  file=sys.stderr)
    for length, (dtype, dim, group), params in trials:
        keys = _config_keys(dtype, dim, group, args.page_size, length, lengths)
        trials.set_postfix_str(keys[0])
        base = dict(tuned.DEFAULTS["paged_decode"])
        ms = _time_decode(dtype, dim, group, args.page_size, length, {**base, **params})
        for key in keys:
            if ms < timings.get(key, float("inf")):
                timings[key] = ms
                best[key] = {**base, **params}
    for length, (dtype, dim, group) in tqdm(list(itertools.product(lengths, SHAPE_CLASSES)), unit="class",
                                            desc="latency parameters", file=sys.stderr):
        keys = _config_keys(dtype, dim, group, args.page_size, length, lengths)
        for name, values in LATENCY_SPACE.items():
            for value in values:
                params = {**best[keys[0]], name: value}
                ms = _time_decode(dtype, dim, group, args.page_size, length, params)
                for key in keys:
                    if ms < timings[key]:
                        timings[key] = ms
                        best[key] = params
    for length, (dtype, dim, group) in tqdm(list(itertools.product(lengths, SHAPE_CLASSES)), unit="class",
                                            desc="sparse decode", file=sys.stderr):
        dense_key = _config_keys(dtype, dim, group, args.page_size, length, lengths)[0]
        key = f"{dense_key}-sparse"
        best[key] = dict(best[dense_key])
        timings[key] = _time_decode(dtype, dim, group, args.page_size, length, best[key], SPARSE_STRIDE)
        for name, values in SPARSE_SPACE.items():
            for value in values:
                params = {**best[key], name: value}
                ms = _time_decode(dtype, dim, group, args.page_size, length, params, SPARSE_STRIDE)
                if ms < timings[key]:
                    timings[key] = ms
                    best[key] = params
    name = torch.cuda.get_device_name()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{tuned.gpu_slug(name)}.json"
    # the other kernel families of an existing file (e.g. "select", set from a benchmark sweep) stay
    kernels = json.loads(path.read_text()).get("kernels", {}) if path.is_file() else {}
    payload = {"device": name, "triton": triton.__version__, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "lengths": lengths,
               "median_ms": timings, "kernels": {**kernels, "paged_decode": best}}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    tuned.load_store.cache_clear()
    print(f"wrote {path}")
    return 0
