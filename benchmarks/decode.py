"""Decode-step benchmark: softmax SDPA against our entmax decode, side by side, on data families.

One run times, per configuration (data family x batch x heads x length x dtype), on the same q/K/V:

- ``flash``, ``cudnn``: torch SDPA on that backend (softmax, dense; the speed bar);
- ``dense``, ``topk``, ``gaussian``, ``gaussian_c``, ``certified``: our public
  ``sparse_decode(..., check_values=False)`` with that selector (``gaussian_c`` reads page moments
  stored in the cache dtype, ``gaussian`` float32 ones; ``topk`` keeps 3% of the tokens);
- ``certified_s``: the certified selector with the int8 key sketch (``certify_sketch="int8"``),
  through a ``Decoder`` that keeps the sketch (``sparse_decode`` would rebuild it every call);
- ``certified_d``: the certified selector as a decode loop runs it, a ``Decoder`` replaying its
  own CUDA graphs (``cuda_graph=True``): when the bounds clear too little and every sequence reads
  densely, it replays the dense step's graph; timed per ``run`` call, host work included (the
  other rows time a captured replay); the median leaves out its probe steps (one in 32 by
  default, which run the bounds again).

Each step is captured in a CUDA graph and its replay timed by ``triton.testing.do_bench``
(median; ``--eager`` also times our steps uncaptured). Next to each time: the bytes the method
must read (SDPA: all of K and V; ours: the page statistics its selector reads plus K and V of the
pages it attends), the achieved GB/s on them and the time those bytes take at 4.3 TB/s (the
floor), the fraction of pages attended, the relative error of the output against exact full
entmax (float32, plain torch, :mod:`benchmarks.exact`), the fraction of certified heads, and the
speedup over SDPA flash. A failing method becomes a row with a note; the run goes on.

    python benchmarks/decode.py --preset quick --out OUT        # H200: < 5 min
    python benchmarks/decode.py --preset full --out OUT --dtypes fp16 --batches 1   # split full
    python benchmarks/decode.py --preset smoke --out OUT        # CPU plumbing check, < 60 s

Writes ``OUT/decode.json`` (rewritten after every configuration) and ``OUT/speedup_*.png``; the
last lines printed are the summary tables (:mod:`benchmarks.report`).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report, timing  # noqa: E402
from benchmarks.data_families import CHUNK, FAMILIES, generate  # noqa: E402
from benchmarks.exact import exact_entmax_decode  # noqa: E402
from entmaxkv_compile import EntmaxKVConfig, KVPageStats, sparse_decode  # noqa: E402
from entmaxkv_compile.runtime.decoder import Decoder  # noqa: E402
from entmaxkv_compile.runtime.sketch.reference import KeySketch  # noqa: E402
from entmaxkv_compile.runtime.stats.reference import stats_state_after_prefill_  # noqa: E402

PAGE = 16
ALPHA = 1.5
TOPK_FRACTION = 0.03
FLOOR_TBPS = 4.3  # the lent H200's device-copy bandwidth (shared/DESIGN.md section 5)
METHODS = ("flash", "cudnn", "dense", "topk", "gaussian", "gaussian_c", "certified", "certified_s",
           "certified_d")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

PRESETS: dict[str, dict] = {
    "smoke": dict(device="cpu", families=list(FAMILIES), batches=[1], heads=[(4, 2)], lengths=[512],
                  dim=64, dtypes=["fp32"], budget_s=300.0),
    "quick": dict(device="cuda", families=["iid", "planted2", "heavy", "lowrank_rope", "real"], batches=[1],
                  heads=[(32, 8)], lengths=[32768, 131072, 1048576], dim=128, dtypes=["fp16"],
                  budget_s=280.0),
    "full": dict(device="cuda", families=list(FAMILIES), batches=[1, 8], heads=[(32, 8), (8, 8)],
                 lengths=[32768, 131072, 524288, 1048576], dim=128, dtypes=["fp16", "bf16"], budget_s=450.0),
}


def page_stats(k: torch.Tensor, moment_dtype: torch.dtype | None) -> KVPageStats:
    """Page statistics of a full cache ``k``, built :data:`CHUNK` tokens at a time (bounded
    temporaries at 1M tokens x B = 8); moments in ``moment_dtype`` (None = float32)."""
    batch, hkv, n, dim = k.shape
    stats = KVPageStats.allocate(batch, hkv, n, dim, PAGE, k.dtype, k.device, moment_dtype=moment_dtype)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        lengths = torch.full((batch,), stop - start, dtype=torch.int32, device=k.device)
        part = KVPageStats.from_cache(k[:, :, start:stop].contiguous(), lengths, PAGE, check_values=False,
                                      moment_dtype=moment_dtype)
        first, last = start // PAGE, -(-stop // PAGE)
        for dst, src in zip(stats.buffers(), part.buffers()):
            dst[:, :, first:last].copy_(src)
    # Buffers filled by hand: record that they describe all n rows, as KVPageStats.prefill does
    # (statistics of unknown provenance are never certified).
    full = torch.full((batch,), n, dtype=torch.int32, device=k.device)
    stats_state_after_prefill_(full, n, stats.last_position, stats.valid)
    return stats


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


class Case:
    """One configuration's data, oracle and page statistics, and the timing of each method on it."""

    def __init__(self, family: str, batch: int, hq: int, hkv: int, n: int, dim: int, dtype: torch.dtype,
                 device: torch.device, seed: int, eager: bool = False) -> None:
        self.device, self.eager = device, eager
        self.q, self.k, self.v = generate(family, batch, hq, hkv, n, dim, dtype, device, seed)
        self.seqlens = torch.full((batch,), n, dtype=torch.int32, device=device)
        self.ref = exact_entmax_decode(self.q, self.k, self.v, ALPHA)
        self.pages = -(-n // PAGE)
        self.esz = self.k.element_size()
        self.kv_bytes = 2 * self.k.numel() * self.esz
        self.stats: dict[str, KVPageStats] = {}

    def _stats(self, which: str) -> KVPageStats:
        if which not in self.stats:
            self.stats[which] = page_stats(self.k, self.k.dtype if which == "cache" else None)
        return self.stats[which]

    def run(self, method: str) -> dict:
        row: dict = dict(method=method, ms=None, bytes=None, gbps=None, floor_ms=None, selected=None,
                         rel_err=None, certified=None, graphed=None, note=None)
        try:
            if method in ("flash", "cudnn"):
                self._sdpa(method, row)
            else:
                self._ours(method, row)
        except Exception as exc:  # noqa: BLE001 - a failing method is a row note, the run goes on
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if row["ms"] and row["bytes"]:
            row["gbps"] = row["bytes"] / row["ms"] / 1e6
            row["floor_ms"] = row["bytes"] / (FLOOR_TBPS * 1e9)
        return row

    def _sdpa(self, backend: str, row: dict) -> None:
        fn, note = timing.sdpa_step(self.q, self.k, self.v, backend)
        replay, _, capture_note = timing.capture(fn, self.device)
        row.update(ms=timing.bench(replay, self.device), bytes=self.kv_bytes, selected=1.0,
                   graphed=capture_note is None and self.device.type == "cuda",
                   note="; ".join(filter(None, (note, capture_note))) or None)

    def _ours(self, method: str, row: dict) -> None:
        n, dim = self.k.shape[2], self.k.shape[3]
        batch, hkv = self.k.shape[:2]
        selector = {"gaussian_c": "gaussian", "certified_s": "certified",
                    "certified_d": "certified"}.get(method, method)
        budget = max(PAGE, int(TOPK_FRACTION * n) // PAGE * PAGE)
        config = EntmaxKVConfig(selector=selector, page_size=PAGE, alpha=ALPHA, token_budget=budget,
                                certify_sketch="int8" if method == "certified_s" else "off")
        stats = self._stats("cache" if method == "gaussian_c" else "float32")
        q, k, v, seqlens = self.q, self.k, self.v, self.seqlens
        sketch, sketch_bytes = None, 0
        if method == "certified_s":
            sketch = KeySketch.from_cache(k, seqlens, check_values=False)
            sketch_bytes = sum(t.numel() * t.element_size() for t in sketch.buffers())
        own_graphs = method == "certified_d"  # a Decoder replaying its own graphs, timed as called
        if method in ("certified_s", "certified_d"):
            decoder = Decoder.for_cache(k, q.shape[1], config, stats=stats, sketch=sketch, cuda_graph=own_graphs)

            def step():
                return decoder.run(q, k, v, seqlens)
        else:
            def step():
                return sparse_decode(q, k, v, seqlens, config, stats, check_values=False)

        if own_graphs:
            for _ in range(40):  # past the first probe: the fallback counter is in its steady state
                step()
            replay, result, note = step, step(), None
        else:
            replay, result, note = timing.capture(step, self.device)
        row["ms"] = timing.bench(replay, self.device)
        if self.eager and replay is not step:
            row["eager_ms"] = timing.bench(step, self.device)
        replay()  # the graph's output tensors now hold one replay's result
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        selected = result.num_selected.to(torch.int64)
        pages_per_head = batch * hkv * self.pages
        stat_bytes = pages_per_head * dim * sum(t.element_size() for t in self._stat_tensors(method, stats))
        row.update(bytes=stat_bytes + sketch_bytes + int(selected.sum()) * PAGE * dim * self.esz * 2,
                   selected=float(selected.sum()) / pages_per_head, rel_err=_rel_err(result.out, self.ref),
                   certified=float(result.certified.float().mean()),
                   graphed=note is None and self.device.type == "cuda", note=note)

    @staticmethod
    def _stat_tensors(method: str, stats: KVPageStats) -> list[torch.Tensor]:
        """The statistics a selector must read: kmin/kmax (Quest bound), kmean/km2 (gaussian);
        the sketch-certified step reads none of them."""
        return {"dense": [], "topk": [stats.kmin, stats.kmax], "gaussian": [stats.kmean, stats.km2],
                "gaussian_c": [stats.kmean, stats.km2],
                "certified": [stats.kmin, stats.kmax, stats.kmean, stats.km2],
                "certified_s": [],  # the sketch's bytes are counted by the caller
                "certified_d": [stats.kmin, stats.kmax, stats.kmean, stats.km2]}[method]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, required=True, help="directory for decode.json and plots")
    parser.add_argument("--families", help=f"comma list of {','.join(FAMILIES)}")
    parser.add_argument("--batches", help="comma list, e.g. 1,8")
    parser.add_argument("--heads", help="comma list of Hq/Hkv, e.g. 32/8,8/8")
    parser.add_argument("--lengths", help="comma list of N, e.g. 32768,131072")
    parser.add_argument("--dtypes", help="comma list of fp16,bf16,fp32")
    parser.add_argument("--dim", type=int, help="head dim D (default: the preset's)")
    parser.add_argument("--methods", help=f"comma list of {','.join(METHODS)} (default: all)")
    parser.add_argument("--device", help="cuda or cpu (default: the preset's)")
    parser.add_argument("--budget-s", type=float, help="stop starting configurations after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager", action="store_true",
                        help="also time our steps without the CUDA graph (JSON key eager_ms)")
    return parser.parse_args(argv)


def _plan(args: argparse.Namespace) -> dict:
    plan = dict(PRESETS[args.preset])
    if args.families:
        plan["families"] = args.families.split(",")
    if args.batches:
        plan["batches"] = [int(x) for x in args.batches.split(",")]
    if args.heads:
        plan["heads"] = [tuple(int(y) for y in x.split("/")) for x in args.heads.split(",")]
    if args.lengths:
        plan["lengths"] = [int(x) for x in args.lengths.split(",")]
    if args.dtypes:
        plan["dtypes"] = args.dtypes.split(",")
    plan["methods"] = args.methods.split(",") if args.methods else list(METHODS)
    plan["device"] = args.device or plan["device"]
    plan["dim"] = args.dim or plan["dim"]
    if args.budget_s is not None:
        plan["budget_s"] = args.budget_s
    for name, values, known in (("families", plan["families"], FAMILIES), ("dtypes", plan["dtypes"], DTYPES),
                                ("methods", plan["methods"], METHODS)):
        unknown = [x for x in values if x not in known]
        if unknown:
            raise SystemExit(f"--{name}: unknown {unknown}; known: {list(known)}")
    return plan


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    plan = _plan(args)
    device = torch.device(plan["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("preset needs a CUDA GPU (use --preset smoke or --device cpu)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    meta = report.environment(device)
    meta.update(preset=args.preset, alpha=ALPHA, page_size=PAGE, topk_fraction=TOPK_FRACTION,
                floor_tbps=FLOOR_TBPS, copy_gbps=timing.copy_bandwidth(device), seed=args.seed,
                plan={k: v for k, v in plan.items()}, rows=[], skipped=[])
    print(report.header(meta), flush=True)
    configs = [(dt, b, h, fam, n) for dt in plan["dtypes"] for b in plan["batches"] for h in plan["heads"]
               for fam in plan["families"] for n in plan["lengths"]]
    for index, (dt, batch, (hq, hkv), family, n) in enumerate(configs, 1):
        label = f"[{index}/{len(configs)}] {family} B={batch} {hq}/{hkv} {dt} N={n}"
        if time.time() - t0 > plan["budget_s"]:
            print(f"{label}: skipped, time budget {plan['budget_s']:.0f}s spent", flush=True)
            meta["skipped"].append(dict(family=family, batch=batch, hq=hq, hkv=hkv, n=n, dtype=dt))
            continue
        key = dict(family=family, batch=batch, hq=hq, hkv=hkv, n=n, dim=plan["dim"], dtype=dt)
        start = time.time()
        case = None
        try:
            case = Case(family, batch, hq, hkv, n, plan["dim"], DTYPES[dt], device, args.seed, eager=args.eager)
            prep = time.time() - start
            rows = [dict(key, **case.run(m)) for m in plan["methods"]]
        except Exception as exc:  # noqa: BLE001 - e.g. OOM while generating: note it, go on
            prep, rows = time.time() - start, [dict(key, method="(setup)", ms=None,
                                                    note=f"{type(exc).__name__}: {str(exc)[:160]}")]
        finally:
            del case
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report.add_speedups(rows)
        meta["rows"].extend(rows)
        print(f"{label}: {time.time() - start:.1f}s (setup {prep:.1f}s) {report.progress(rows)}", flush=True)
        (args.out / "decode.json").write_text(json.dumps(meta, indent=1))
    meta["elapsed_s"] = time.time() - t0
    (args.out / "decode.json").write_text(json.dumps(meta, indent=1))
    for note in report.plot(meta["rows"], args.out):
        print(note, flush=True)
    print(report.tables(meta), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
