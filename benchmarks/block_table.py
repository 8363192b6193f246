"""What the block-table indirection costs: the decode step over a paged cache against the same
step over the contiguous cache holding the same data.

Per configuration (length x batch x selector), on the same q, K and V: ``contiguous`` runs
``run_step`` over ``[B, Hkv, N, D]`` caches with per-row statistics; ``table`` runs it over page
pools ``[num_blocks, P, Hkv, D]`` whose blocks are a random permutation of the same pages (a
shuffled block table, as a serving engine's allocator leaves it) with per-block statistics.
Both steps are captured in a CUDA graph and their replays timed by ``triton.testing.do_bench``
(median, ``benchmarks/timing.py``). Printed and written to ``OUT/block_table.json``: both times,
the overhead of the table in percent (the target is < 5%), and whether the two outputs are
identical (they should be bit for bit: same tokens, same order of arithmetic).

    python benchmarks/block_table.py --out OUT                  # GPU: GQA 32/8, D 128, fp16
    python benchmarks/block_table.py --preset smoke --out OUT   # CPU plumbing check, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import timing  # noqa: E402
from benchmarks.dense_decode import kernel_breakdown  # noqa: E402
from entmaxkv_compile import EntmaxKVConfig, KVPageStats, PagedKVStats  # noqa: E402
from entmaxkv_compile.runtime.paged import pool_from_cache  # noqa: E402
from entmaxkv_compile.runtime.step import implementation_for, run_step  # noqa: E402
from entmaxkv_compile.runtime.tuning import tuned  # noqa: E402

PAGE = 16
ALPHA = 1.5
TARGET_OVERHEAD = 5.0  # percent (issue 13)
PRESETS = {
    "quick": dict(lengths=(32768, 131072, 1048576), batches=(1, 8), q_heads=32, kv_heads=8, dim=128,
                  dtype="fp16", selectors=("dense", "topk", "gaussian", "certified")),
    "smoke": dict(lengths=(200,), batches=(2,), q_heads=4, kv_heads=2, dim=32, dtype="fp32",
                  selectors=("dense", "certified")),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def paged_copy(cache: torch.Tensor, perm: torch.Tensor, layout: str = "nhd") -> tuple[torch.Tensor, torch.Tensor]:
    """``(pool, table)``: ``cache``'s pages moved to the blocks ``perm`` (a shuffled table). The
    pool is ``[blocks, P, Hkv, D]``; with ``layout="hnd"`` it is stored ``[blocks, Hkv, P, D]``
    (FlashInfer's HND: one head's page is contiguous) and passed as its transposed view."""
    identity_pool, identity = pool_from_cache(cache, PAGE)
    if layout == "hnd":
        pool = torch.empty_like(identity_pool.transpose(1, 2).contiguous())
        pool[perm] = identity_pool.transpose(1, 2)
        pool = pool.transpose(1, 2)
    else:
        pool = torch.empty_like(identity_pool)
        pool[perm] = identity_pool
    return pool, perm[identity.long()].to(torch.int32)


RUN_BLOCKS = 64  # "runs": 64 blocks of 16 tokens x 8 heads x 128 x fp16 = 2 MiB, one large GPU page


def block_order(num_blocks: int, allocation: str, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Where each page of the caches lands in the pool: ``shuffled`` (a random block per page: the
    worst case for locality), ``runs`` (runs of ``RUN_BLOCKS`` consecutive blocks at random places,
    as an allocator handing out a sequence's blocks from a free list of whole runs does) or
    ``identity`` (the table's indirection alone)."""
    if allocation == "identity":
        return torch.arange(num_blocks, device=device)
    if allocation == "shuffled":
        return torch.randperm(num_blocks, generator=gen, device=device)
    runs = -(-num_blocks // RUN_BLOCKS)
    starts = torch.randperm(runs, generator=gen, device=device) * RUN_BLOCKS
    order = (starts[:, None] + torch.arange(RUN_BLOCKS, device=device)).flatten()
    return order[order < num_blocks]  # the last run may be partial: every id below num_blocks once


def contiguous_and_table_steps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor,
                               selector: str, perm: torch.Tensor, layout: str = "nhd") -> tuple[Callable, Callable]:
    """``(contiguous, through_table)``: one ``run_step`` each over the caches ``[B, Hkv, N, D]``
    (whole pages) with per-row statistics, and over page pools holding the same pages at the
    blocks ``perm`` with per-block statistics. ``selector`` may end in ``_c`` (moments in the
    cache dtype, e.g. ``gaussian_c``)."""
    base, _, suffix = selector.partition("_")
    compact = suffix == "c"
    batch, kv_heads, capacity, dim = k.shape
    num_pages = capacity // PAGE
    moment_dtype = k.dtype if compact else None
    k_pool, table = paged_copy(k, perm, layout)
    v_pool, _ = paged_copy(v, perm, layout)
    flat = KVPageStats.from_cache(k, seqlens, PAGE, check_values=False, moment_dtype=moment_dtype)
    paged = PagedKVStats.allocate(batch * num_pages, kv_heads, dim, batch=batch, max_pages=num_pages,
                                  page_size=PAGE, dtype=k.dtype, device=k.device, moment_dtype=moment_dtype)
    paged.prefill(k_pool, seqlens, table)
    config = EntmaxKVConfig(selector=base, page_size=PAGE, alpha=ALPHA, moment_dtype="cache" if compact else "float32",
                            token_budget=max(PAGE, int(0.03 * capacity) // PAGE * PAGE))
    impl = implementation_for(k.device, k.dtype)
    scale = 1.0 / math.sqrt(dim)

    def contiguous():
        return run_step(impl, q, k, v, seqlens, flat.buffers(), config, alpha=ALPHA, scale=scale,
                        stats_valid=flat.valid_for(seqlens))

    def through_table():
        return run_step(impl, q, k_pool, v_pool, seqlens, paged.buffers(), config, alpha=ALPHA, scale=scale,
                        stats_valid=paged.valid_for(seqlens), block_table=table)

    return contiguous, through_table


def one_config(length: int, batch: int, selector: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time the contiguous and the table step of one configuration."""
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(length + batch)
    num_pages = -(-length // PAGE)
    shape = (batch, args.kv_heads, num_pages * PAGE, args.dim)  # whole pages: the pools' capacity
    q = torch.randn(batch, args.q_heads, 1, args.dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    # odd lengths (a partial last page), different per row
    seqlens = torch.tensor([length - 1 - 7 * b for b in range(batch)], dtype=torch.int32, device=device)
    perm = block_order(batch * num_pages, args.allocation, gen, device)
    contiguous, through_table = contiguous_and_table_steps(q, k, v, seqlens, selector, perm, args.layout)

    row = dict(length=length, batch=batch, selector=selector, layout=args.layout, allocation=args.allocation,
               dtype=args.dtype, q_heads=args.q_heads,
               kv_heads=args.kv_heads, dim=args.dim, page_size=PAGE)
    results = {}
    for name, step in (("contiguous", contiguous), ("table", through_table)):
        replay, result, note = timing.capture(step, device)
        results[name] = result
        row[f"{name}_ms"] = timing.bench(replay, device)
        if args.profile and device.type == "cuda":
            row[f"{name}_kernels_us"] = kernel_breakdown(step)
        if note:
            row[f"{name}_note"] = note
    row["overhead_pct"] = 100.0 * (row["table_ms"] / row["contiguous_ms"] - 1.0)
    row["identical"] = all(torch.equal(a, b) for a, b in zip(results["contiguous"], results["table"]))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="quick on a GPU, smoke on a CPU (default: by device)")
    parser.add_argument("--out", type=Path, required=True, help="folder for block_table.json")
    parser.add_argument("--lengths", type=int, nargs="*", help="override the preset's lengths")
    parser.add_argument("--batches", type=int, nargs="*", help="override the preset's batch sizes")
    parser.add_argument("--selectors", nargs="*",
                        help="override the preset's selectors (gaussian_c: moments in the cache dtype)")
    parser.add_argument("--layout", choices=("nhd", "hnd"), default="nhd",
                        help="pool layout: vLLM / FlashInfer NHD [blocks, P, Hkv, D] or FlashInfer HND")
    parser.add_argument("--allocation", choices=("shuffled", "runs", "identity"), default="shuffled",
                        help="where the pages land in the pool (see block_order)")
    parser.add_argument("--profile", action="store_true", help="per-kernel device times of one eager step each")
    parser.add_argument("--decode-params", type=json.loads, default={},
                        help='decode launch parameters over the tuned ones, e.g. \'{"SLOT_TILES": 0}\'')
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("quick" if device.type == "cuda" else "smoke")]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out.mkdir(parents=True, exist_ok=True)
    with tuned.override("paged_decode", args.decode_params):
        rows = _all_configs(args, device)
    print(f"{'length':>8} {'B':>2} {'selector':>10} {'contig ms':>10} {'table ms':>9} {'overhead':>9} identical")
    for row in rows:
        if "error" in row:
            print(f"{row['length']:>8} {row['batch']:>2} {row['selector']:>10} error: {row['error'][:80]}")
            continue
        flag = "" if row["overhead_pct"] < TARGET_OVERHEAD else "  (> 5%)"
        print(f"{row['length']:>8} {row['batch']:>2} {row['selector']:>10} {row['contiguous_ms']:>10.4f} "
              f"{row['table_ms']:>9.4f} {row['overhead_pct']:>8.1f}% {row['identical']}{flag}")
    return rows


def _all_configs(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every (length, batch, selector) row; JSON rewritten after each."""
    rows = []
    for length in args.lengths:
        for batch in args.batches:
            for selector in args.selectors:
                try:
                    rows.append(one_config(length, batch, selector, args, device))
                except Exception as exc:  # noqa: BLE001 - a failing configuration is a row with a note
                    rows.append(dict(length=length, batch=batch, selector=selector,
                                     error=f"{type(exc).__name__}: {exc}"))
                (args.out / "block_table.json").write_text(json.dumps(
                    dict(device=str(device), decode_params=args.decode_params, rows=rows), indent=1))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
