"""Launch-parameter sweep of the decode and selection kernels on one GPU, by coordinate descent.

The question this answers: which grid and tile shape the K pass (``paged_decode``) and the
page-moment scan (``select_pages``, gaussian) need on this GPU, per cache length. For each case
(data family, N; GQA 32/8, D = 128, fp16, alpha 1.5) it starts from the shipped config, tries
every value of one parameter at a time keeping the best so far, and times each candidate as a
CUDA-graph replay (do_bench median). The best config's one-step kernel breakdown and SDPA flash
on the same cache are recorded beside it. Writes ``sweep_launch.json``; the chosen values go into
``runtime/tuning/configs/<gpu>.json`` by hand, with this file's numbers as the source.

``--decode-over gaussian`` times the decode over the pages the gaussian selection keeps (a sparse
step's decode) instead of over every page.

Usage: ``python benchmarks/sweep_launch.py --out DIR [--cases planted:131072,iid:1048576]
[--decode-params tau_warps,BLOCK_TAU] [--select-params MOMENTS_DOT] [--scan-params SCAN_WARPS]
[--no-scan] [--decode-over gaussian]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dense_decode import PAGE, DIM, graphed, kernel_breakdown, make_family  # noqa: E402
from entmaxkv_compile.runtime import kernels  # noqa: E402
from entmaxkv_compile.checks import stats_shape  # noqa: E402
from entmaxkv_compile.runtime.sketch.reference import KeySketch  # noqa: E402
from entmaxkv_compile.runtime.tuning import tuned  # noqa: E402
from entmaxkv_compile.tables import render_table  # noqa: E402

DECODE_SPACE = {"PROGRAMS_PER_SM": (2, 3, 4, 6, 8, 12, 16), "num_warps": (4, 8), "num_stages": (2, 3, 4), "BLOCK_N": (64, 128),
                "BLOCK_T": (32, 64), "tau_warps": (1, 2, 4), "BLOCK_TAU": (32, 64, 128),
                "TAU_PROGRAMS_PER_SM": (4, 8, 16, 32), "out_warps": (2, 4, 8),
                "MIN_SPLIT_PAGES": (1, 2, 4, 8, 16)}
SELECT_SPACE = {"MOMENTS_DOT": (0, 2), "MOMENTS_BLOCKS": (2, 4, 8, 16, 32), "BLOCK_PM": (16, 32, 64),
                "num_warps": (2, 4, 8), "BLOCK_PS": (256, 1024, 2048, 4096)}
SCAN_SPACE = {"SCAN_PROGRAMS_PER_SM": (2, 4, 8, 16), "SCAN_BLOCK_N": (32, 64, 128, 256, 512), "SCAN_WARPS": (4, 8)}
DEFAULT_CASES = "planted:32768,planted:131072,iid:131072,planted:1048576,iid:1048576"
HQ, HKV = 32, 8


def _time(fn) -> float:
    from triton.testing import do_bench

    try:
        return float(do_bench(graphed(fn), warmup=10, rep=50, return_mode="median"))
    except Exception as exc:  # noqa: BLE001 - a config the compiler rejects is skipped
        print(f"    failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", flush=True)
        return math.inf


def descend(family: str, start: dict, space: dict, step) -> tuple[dict, list[dict]]:
    """Coordinate descent from ``start`` over ``space``: ``(best, trials)``."""
    best = dict(start)
    best_ms = _timed(family, best, step)
    trials = [dict(params=dict(best), ms=best_ms)]
    for name, values in space.items():
        for value in values:
            if value == best.get(name):
                continue
            cand = {**best, name: value}
            ms = _timed(family, cand, step)
            trials.append(dict(params=cand, ms=ms))
            if ms < best_ms:
                best, best_ms = cand, ms
        print(f"    {name} -> {best[name]} ({best_ms * 1e3:.1f} us)", flush=True)
    return best, trials


def _timed(family: str, params: dict, step) -> float:
    with tuned.override(family, params):
        return _time(step)


def _only(space: dict, names: str | None) -> dict:
    """``space`` restricted to the comma-separated parameter ``names`` (all when None), swept in
    the order named."""
    if names is None:
        return space
    wanted = [name for name in names.split(",") if name]  # "" sweeps nothing: the shipped config alone
    unknown = sorted(set(wanted) - set(space))
    if unknown:
        raise SystemExit(f"unknown parameters {unknown}; choose from {sorted(space)}")
    return {k: space[k] for k in wanted}


def run_case(family: str, n: int, decode_space: dict, select_space: dict, scan_space: dict | None,
             decode_over: str = "dense") -> dict:
    """One case's sweeps (``scan_space`` None: no sketch scan sweep; ``decode_over``: the pages the
    decode reads, every page or the gaussian selection's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = make_family(family, 1, HQ, HKV, n, torch.float16)
    scale = 1.0 / math.sqrt(DIM)
    seqlens = torch.full((1,), n, dtype=torch.int32, device="cuda")
    pages = n // PAGE
    idx = torch.arange(pages, dtype=torch.int32, device="cuda").repeat(1, HKV, 1).contiguous()
    nsel = torch.full((1, HKV), pages, dtype=torch.int32, device="cuda")

    def decode():
        return kernels.paged_decode(q, k, v, seqlens, idx, nsel, page_size=PAGE, alpha=1.5,
                                    scale=scale, read_all=decode_over == "dense")

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    stats = [torch.empty(stats_shape(k, PAGE), device="cuda", dtype=k.dtype) for _ in range(4)]
    kernels.stats_prefill_(k, seqlens, PAGE, *stats)

    def select():
        return kernels.select_pages(
            q, *stats, seqlens, page_size=PAGE, alpha=1.5, scale=scale, selector="gaussian",
            token_budget=4096, max_quantile=0.999, margin=0.0, tau_estimate="auto", sink_pages=1,
            recent_pages=1, min_context=0)

    if decode_over == "gaussian":
        idx, nsel = select()
    sketch = KeySketch.from_cache(k, seqlens, check_values=False)
    read_all = torch.zeros(1, dtype=torch.bool, device="cuda")

    def sketch_select():
        return kernels.sketch_select(q, *sketch.buffers(), seqlens, read_all, page_size=PAGE, alpha=1.5,
                                     scale=scale)

    print(f"{family} N={n}", flush=True)
    row = dict(family=family, n=n, hq=HQ, hkv=HKV, sdpa_ms=_time(sdpa), decode_over=decode_over,
               pages_read=float(nsel.float().mean()) / pages)
    shipped = tuned.decode_config(q.device, q.dtype, DIM, HQ // HKV, PAGE, n, sparse=decode_over != "dense")
    best, trials = descend("paged_decode", shipped, decode_space, decode)
    row.update(decode_shipped=shipped, decode_best=best, decode_trials=trials)
    with tuned.override("paged_decode", best):
        row["decode_kernels_us"] = kernel_breakdown(decode)
    shipped = tuned.lookup("select", q.device, "default", n)
    best, trials = descend("select", shipped, select_space, select)
    row.update(select_shipped=shipped, select_best=best, select_trials=trials)
    with tuned.override("select", best):
        row["select_kernels_us"] = kernel_breakdown(select)
        if scan_space is None:
            return row
        best, trials = descend("select", best, scan_space, sketch_select)
    row.update(scan_best=best, scan_trials=trials)
    with tuned.override("select", best):
        row["scan_kernels_us"] = kernel_breakdown(sketch_select)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for sweep_launch.json")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated family:N")
    parser.add_argument("--decode-params", help=f"sweep only these of {','.join(DECODE_SPACE)}")
    parser.add_argument("--select-params", help=f"sweep only these of {','.join(SELECT_SPACE)}")
    parser.add_argument("--no-scan", action="store_true", help="skip the key sketch's scan sweep")
    parser.add_argument("--scan-params", help=f"sweep only these of {','.join(SCAN_SPACE)}")
    parser.add_argument("--decode-over", choices=("dense", "gaussian"), default="dense",
                        help="the pages the decode sweep reads: every page, or the gaussian selection's")
    args = parser.parse_args()
    decode_space = _only(DECODE_SPACE, args.decode_params)
    select_space = _only(SELECT_SPACE, args.select_params)
    scan_space = _only(SCAN_SPACE, args.scan_params)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        family, n = case.split(":")
        rows.append(run_case(family, int(n), decode_space, select_space, None if args.no_scan else scan_space,
                             args.decode_over))
        (args.out / "sweep_launch.json").write_text(json.dumps(rows, indent=1))
        torch.cuda.empty_cache()

    def ms(trials, params):
        return min(t["ms"] for t in trials if t["params"] == params)

    table = []
    for r in rows:
        table.append([r["family"], str(r["n"]), f"{r['sdpa_ms']:.4f}",
                      f"{ms(r['decode_trials'], r['decode_shipped']):.4f}",
                      f"{ms(r['decode_trials'], r['decode_best']):.4f}",
                      " ".join(f"{k}={v}" for k, v in r["decode_best"].items()
                               if r["decode_shipped"].get(k) != v),
                      f"{ms(r['select_trials'], r['select_shipped']):.4f}",
                      f"{ms(r['select_trials'], r['select_best']):.4f}",
                      " ".join(f"{k}={v}" for k, v in r["select_best"].items()
                               if r["select_shipped"].get(k) != v),
                      f"{ms(r['scan_trials'], r['scan_trials'][0]['params']):.4f}" if "scan_trials" in r else "-",
                      f"{min(t['ms'] for t in r['scan_trials']):.4f}" if "scan_trials" in r else "-",
                      " ".join(f"{k}={v}" for k, v in r.get("scan_best", {}).items()
                               if k.startswith("SCAN") and r["select_best"].get(k) != v)])
    print(render_table(["family", "N", "SDPA ms", "decode shipped", "decode best", "changed",
                        "select shipped", "select best", "changed", "scan shipped", "scan best", "changed"], table,
                       right=("N", "SDPA ms", "decode shipped", "decode best", "select shipped",
                              "select best")))


if __name__ == "__main__":
    main()
