"""How informative the approximate selectors' dropped-mass bound is, per data family (CPU).

For the gaussian and top-k selectors (``report_bound=True``) this runs one step
(``sparse_decode``, the pure-torch path: device-independent) with the page-level bound alone and
with the int8 key sketch's token-level bound (``certify_sketch="int8"``), and compares both with
the full-entmax mass the selection actually dropped (float64 reference), per query head. A bound
is only useful if it is near the measured mass: the page-level form counts every token of an
unselected page at the page's box bound.

Data: the families of :mod:`benchmarks.data_families`, B = 1, GQA 32/8, D = 128, float32,
alpha 1.5, page 16, top-k 3% of the tokens.

Usage: ``python -m benchmarks.delta_bounds --out DIR [--tokens 16384] [--families ...]``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from benchmarks.certified_pages import ALPHA, DIM, HKV, HQ, PAGE, run_record
from benchmarks.data_families import generate
from entmaxkv_compile import EntmaxKVConfig, sparse_decode
from entmaxkv_compile.metrics import full_entmax_decode
from entmaxkv_compile.runtime.select.reference import selected_token_mask
from entmaxkv_compile.tables import render_table

FAMILIES = ("planted2", "planted8", "lowrank_rope", "heavy", "iid", "real")


def measure(family: str, tokens: int, selector: str, seed: int = 0) -> dict:
    """Measured dropped mass and both bounds (means and maxima over the query heads)."""
    q, k, v = generate(family, 1, HQ, HKV, tokens, DIM, torch.float32, "cpu", seed)
    seqlens = torch.tensor([tokens])
    scale = 1 / math.sqrt(DIM)
    _, probs = full_entmax_decode(q, k, v, seqlens, ALPHA, scale)
    common = dict(selector=selector, page_size=PAGE, alpha=ALPHA, report_bound=True,
                  token_budget=max(PAGE, int(0.03 * tokens)))
    coarse = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(**common), scale=scale, check_values=False)
    fine = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(**common, certify_sketch="int8"), scale=scale,
                         check_values=False)
    chosen = selected_token_mask(fine.page_indices, fine.num_selected, seqlens, page_size=PAGE, max_seqlen=tokens)
    chosen = chosen.repeat_interleave(HQ // HKV, dim=1)
    dropped = torch.where(chosen, 0.0, probs).sum(-1).double()
    if bool((fine.delta_bound.double() < dropped - 1e-5).any()):
        raise AssertionError(f"{family}, {selector}: the token-level bound is below the dropped mass")
    return dict(family=family, selector=selector, tokens=tokens,
                pages_selected=float(fine.num_selected.sum()) / (HKV * -(-tokens // PAGE)),
                dropped_mean=float(dropped.mean()), dropped_max=float(dropped.max()),
                page_bound_mean=float(coarse.delta_bound.mean()),
                token_bound_mean=float(fine.delta_bound.mean()), token_bound_max=float(fine.delta_bound.max()),
                certified_heads=float(fine.certified.float().mean()))


def table(rows: list[dict]) -> str:
    columns = ("family", "selector", "pages selected", "dropped mass (mean, max)", "page-level bound (mean)",
               "token-level bound (mean, max)", "certified heads")
    cells = [(r["family"], r["selector"], f"{100 * r['pages_selected']:.1f}%",
              f"{r['dropped_mean']:.3f}, {r['dropped_max']:.3f}", f"{r['page_bound_mean']:.3f}",
              f"{r['token_bound_mean']:.3f}, {r['token_bound_max']:.3f}", f"{100 * r['certified_heads']:.0f}%")
             for r in rows]
    return render_table(columns, cells, right=columns[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for delta_bounds.json")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of data families")
    parser.add_argument("--selectors", default="gaussian,topk", help="comma list of gaussian,topk")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families.split(","):
        for selector in args.selectors.split(","):
            rows.append(measure(family, args.tokens, selector))
            r = rows[-1]
            print(f"{family} {selector}: dropped {r['dropped_mean']:.3f}, bounds {r['page_bound_mean']:.3f} "
                  f"(pages) / {r['token_bound_mean']:.3f} (tokens)", flush=True)
    (args.out / "delta_bounds.json").write_text(json.dumps(run_record(args.tokens, rows), indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
