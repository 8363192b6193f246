"""Where a selector's decode step spends its time: per-kernel split and launch-config sweep.

For each (family, N, selector) this times a planned ``Decoder``'s ``run`` captured in a CUDA
graph, eagerly without its own graph (``cuda_graph=False``) and as a user calls it by default
(its ``run`` replaying the graph it recorded, results copied out) (do_bench medians) and profiles one eager step with ``torch.profiler``,
summing device time per kernel name, so a miss against the byte floor can be attributed to a
kernel. ``--sweep`` also times the gaussian step under a few launch configs of the selection
kernels. GPU only.

Usage: ``python benchmarks/profile_step.py --out DIR [--lengths 131072,1048576] [--sweep]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data_families import generate  # noqa: E402
from benchmarks.dense_decode import kernel_breakdown  # noqa: E402
from benchmarks.timing import bench, capture  # noqa: E402
from entmaxkv_compile import EntmaxKVConfig, KVPageStats  # noqa: E402
from entmaxkv_compile.runtime.decoder import Decoder  # noqa: E402
from entmaxkv_compile.runtime.sketch.reference import KeySketch  # noqa: E402

PAGE = 16
SELECT_SWEEP = [
    {"MOMENTS_DOT": 0},
    {"MOMENTS_DOT": 2},
    {"MOMENTS_DOT": 0, "MOMENTS_BLOCKS": 8},
    {"MOMENTS_DOT": 2, "MOMENTS_BLOCKS": 8},
    {"MOMENTS_DOT": 0, "BLOCK_PM": 64},
]


def _step(q, k, v, seqlens, config, stats, cuda_graph=False, sketch=None):
    decoder = Decoder.for_cache(k, q.shape[1], config, stats=stats, cuda_graph=cuda_graph, sketch=sketch)

    def run():
        return decoder.run(q, k, v, seqlens)
    return run


def profile_case(family: str, n: int, hq: int, hkv: int, selectors: list[str], sweep: bool,
                 dev: torch.device) -> list[dict]:
    q, k, v = generate(family, 1, hq, hkv, n, 128, torch.float16, dev)
    seqlens = torch.full((1,), n, dtype=torch.int32, device=dev)
    rows = []
    for name in selectors:
        selector, _, suffix = name.partition("_")
        moment_dtype = "cache" if suffix == "c" else "float32"
        sketched = suffix == "s"  # the certified step that selects with the int8 key sketch
        config = EntmaxKVConfig(selector=selector, moment_dtype=moment_dtype,
                                certify_sketch="int8" if sketched else "off")
        stats = KVPageStats.from_cache(k, seqlens, PAGE, check_values=False,
                                       moment_dtype=k.dtype if moment_dtype == "cache" else None)
        sketch = KeySketch.from_cache(k, seqlens, check_values=False) if sketched else None
        step = _step(q, k, v, seqlens, config, stats, sketch=sketch)
        replay, result, note = capture(step, dev)
        own_graphs = _step(q, k, v, seqlens, config, stats, cuda_graph=dev.type == "cuda", sketch=sketch)
        row = dict(family=family, n=n, hq=hq, hkv=hkv, method=name, note=note,
                   ms=bench(replay, dev), eager_ms=bench(step, dev), graphed_run_ms=bench(own_graphs, dev),
                   pages_read=float(result.num_selected.float().mean()) / (n // PAGE))
        try:
            row["kernels_us"] = kernel_breakdown(step)
        except Exception as exc:  # no CUPTI: keep the timing
            row["kernels_us"] = {"profiler unavailable": type(exc).__name__}
        if sweep and selector == "gaussian":
            from entmaxkv_compile.runtime.tuning import tuned
            row["sweep_ms"] = {}
            for params in SELECT_SWEEP:
                merged = {**tuned.lookup("select", dev, "default"), **params}
                with tuned.override("select", merged):
                    try:
                        replay_p, _, _ = capture(_step(q, k, v, seqlens, config, stats), dev)
                        row["sweep_ms"][json.dumps(params)] = bench(replay_p, dev)
                    except Exception as exc:  # a config that does not compile is skipped
                        row["sweep_ms"][json.dumps(params)] = f"failed: {type(exc).__name__}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del stats
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for profile_step.json")
    parser.add_argument("--lengths", default="131072,1048576", help="comma-separated N")
    parser.add_argument("--families", default="planted2", help="comma-separated data families")
    parser.add_argument("--selectors", default="gaussian,gaussian_c,topk,certified,dense",
                        help="selectors; a _c suffix stores the page moments in the cache dtype, "
                             "certified_s selects with the int8 key sketch")
    parser.add_argument("--sweep", action="store_true", help="sweep the selection kernels' configs")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only checks the plumbing)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families.split(","):
        for n in [int(x) for x in args.lengths.split(",")]:
            rows += profile_case(family, n, 32, 8, args.selectors.split(","), args.sweep,
                                 torch.device(args.device))
    (args.out / "profile_step.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'family':>9} {'N':>8} {'method':>11} {'ms':>7} {'eager':>7} {'run':>7} {'pages':>6}  kernels (us)")
    for r in rows:
        top = ", ".join(f"{k[:22]}={v}" for k, v in list(r["kernels_us"].items())[:7])
        print(f"{r['family']:>9} {r['n']:>8} {r['method']:>11} {r['ms']:7.3f} {r['eager_ms']:7.3f} {r['graphed_run_ms']:7.3f} "
              f"{100 * r['pages_read']:5.1f}%  {top}")
        if "sweep_ms" in r:
            print("      sweep:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r["sweep_ms"].items()})


if __name__ == "__main__":
    main()
