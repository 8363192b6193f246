"""How many pages does the *implemented* int8 key sketch clear at the exact tau? (CPU)

``benchmarks/bound_margins.py`` measured an idealised int8 bound (float64 scales, float64
arithmetic). This script runs the code a certified step would run, ``runtime/sketch``'s
``KeySketch.from_cache`` + ``sketch_page_bounds`` (the CPU path; the Triton kernel equals it to
float32 rounding, tests/test_kernels_sketch.py): bfloat16 scales rounded up, float32 arithmetic
plus its rounding slack. For each data family it reports, per (query head, page), the fraction
the sketch clears (``(alpha-1) UB <= tau``, the exact float64 threshold over all tokens), the
fraction a GQA kernel can skip (cleared for every query head of the KV head), the ceiling (true
page max <= tau), the median slack over the true max in units of the query's score std, the same
figures for the idealised bound, and the sketch's bytes per token and KV head. Every implemented
bound is checked to be >= the float64 page max (the script raises otherwise).

Data as in bound_margins.py: its synthetic families at N tokens (B = 1, GQA 32/8, D = 128,
float32 keys, seed 0) and the trained twin's 12 recorded KV heads (head dim 64, 16384 tokens).

Usage: ``python -m benchmarks.sketch_margins --out DIR [--tokens 16384] [--no-twin]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.bound_margins import ALPHA, PAGE, SYNTHETIC, _quant_bound, _synthetic, _twin
from entmaxkv_compile.math.reference import entmax_threshold
from entmaxkv_compile.runtime.sketch.reference import (
    KeySketch,
    sketch_bytes_per_head,
    sketch_page_bounds,
)

__all__ = ["measure_sketch", "main"]


def _pages(tok: torch.Tensor) -> torch.Tensor:
    return tok.reshape(tok.shape[0], -1, PAGE).amax(-1)


def measure_sketch(q: torch.Tensor, k: torch.Tensor, scale: float, alpha: float = ALPHA) -> dict:
    """Clearing statistics of the implemented sketch for query heads ``q [Hkv, G, D]`` over keys
    ``k [Hkv, N, D]`` (N a multiple of the page size), next to the idealised int8 bound."""
    hkv, group, dim = q.shape
    n = k.shape[1]
    seqlens = torch.tensor([n], dtype=torch.int32)
    sketch = KeySketch.from_cache(k[None].contiguous(), seqlens)
    cand = torch.ones(1, hkv, n // PAGE, dtype=torch.bool)
    ub = sketch_page_bounds(q.reshape(1, hkv * group, 1, dim).contiguous(), *sketch.buffers(),
                            seqlens, cand, page_size=PAGE, scale=scale)
    ub = ub[0].reshape(hkv, group, n // PAGE).double() * (alpha - 1)
    c = (alpha - 1) * scale
    acc: dict[str, list] = {}
    for j in range(hkv):
        qj, kj = q[j].double(), k[j].double()
        z = c * (qj @ kj.T)
        tau = entmax_threshold(z / (alpha - 1), alpha=alpha, dim=-1)[:, None]
        std = z.std(dim=1, keepdim=True)
        true = _pages(z)
        if bool((ub[j] < true).any()):
            raise AssertionError(f"the sketch bound fell below a page's true max on KV head {j}")
        ideal = c * _pages(_quant_bound(qj, kj, 127))
        for name, value in (("no_support", true <= tau), ("sketch", ub[j] <= tau),
                            ("ideal", ideal <= tau)):
            acc.setdefault(name, []).append(value.double().flatten())
            acc.setdefault(name + "/gqa", []).append(value.all(0).double())
        acc.setdefault("sketch/slack", []).append(((ub[j] - true) / std).flatten())
        acc.setdefault("ideal/slack", []).append(((ideal - true) / std).flatten())
    mean = {key: torch.cat(val).mean().item() for key, val in acc.items() if "slack" not in key}
    out = {"no_support": mean["no_support"], "gqa_no_support": mean["no_support/gqa"],
           "bytes_per_token_per_head": sketch_bytes_per_head(dim)}
    for name in ("sketch", "ideal"):
        slack = torch.cat(acc[name + "/slack"])
        out[name] = {"clearable": mean[name], "gqa_clearable": mean[name + "/gqa"],
                     "clearable_over_no_support": mean[name] / out["no_support"],
                     "median_slack_std": slack.median().item(), "mean_slack_std": slack.mean().item()}
    return out


def _table(results: dict) -> str:
    lines = ["| data | B/token/head (B/page/head) | no support % | sketch clearable % | sketch GQA clearable % "
             "| clearable / no-support | ideal int8 clearable % (GQA %) | median slack /σ sketch (ideal) "
             "| mean slack /σ sketch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fam, r in results.items():
        s, i = r["sketch"], r["ideal"]
        b = r["bytes_per_token_per_head"]
        lines.append(f"| {fam} | {b} ({b * PAGE}) | {100 * r['no_support']:.2f} | {100 * s['clearable']:.2f} | "
                     f"{100 * s['gqa_clearable']:.2f} | {s['clearable_over_no_support']:.3f} | "
                     f"{100 * i['clearable']:.2f} ({100 * i['gqa_clearable']:.2f}) | "
                     f"{s['median_slack_std']:.3f} ({i['median_slack_std']:.3f}) | {s['mean_slack_std']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for sketch_margins.json")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hq", type=int, default=32)
    parser.add_argument("--hkv", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--families", nargs="+", default=list(SYNTHETIC))
    parser.add_argument("--no-twin", action="store_true", help="skip the tiny_lm twin")
    parser.add_argument("--twin-context", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results, start = {}, time.perf_counter()
    for fam in args.families:
        q, k, scale = _synthetic(fam, args.tokens, args.hq, args.hkv, args.dim, args.seed)
        results[f"{fam} N={args.tokens}"] = measure_sketch(q, k, scale)
        print(f"{fam}: {time.perf_counter() - start:.1f} s", flush=True)
    if not args.no_twin:
        q, k, scale, _ = _twin(args.twin_context)
        results[f"tiny_lm twin N={k.shape[1]}"] = measure_sketch(q, k, scale)
        print(f"twin: {time.perf_counter() - start:.1f} s", flush=True)
    print(_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"alpha": ALPHA, "page": PAGE, "tokens": args.tokens, "hq": args.hq, "hkv": args.hkv,
               "dim": args.dim, "results": results, "seconds": time.perf_counter() - start}
    (args.out / "sketch_margins.json").write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
