"""How many tokens each stage of the exact tau must look at, per data family (CPU, torch).

For one query per head over ``N`` keys of a family (B = 1, GQA 32/8, D = 128, alpha = 1.5) it
counts, per KV group: the *candidates* of the K pass under each split's own running max - 1 (128
splits, tiles of 128 tokens) and under the global max - 1; and per query head: the support of exact
entmax and the values above the lower end of the bracket left by one level of 16 pivots,
log-spaced over tau's proven range. These counts decide where the decode kernels' tau and output
passes spend their time (benchmarks/NOTES.md, "Version 6").

Usage: ``python benchmarks/candidate_counts.py [--n 131072] [--families iid,planted2,...]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data_families import FAMILIES, generate  # noqa: E402
from entmaxkv_compile.tables import render_table  # noqa: E402

ALPHA, HQ, HKV, DIM, SPLITS, TILE, PIVOTS = 1.5, 32, 8, 128, 128, 128, 16


def counts(family: str, n: int) -> dict[str, float]:
    """The counts of the module doc for one family at ``n`` tokens."""
    group = HQ // HKV
    q, k, _ = generate(family, 1, HQ, HKV, n, DIM, torch.float32, "cpu")
    z = (ALPHA - 1) * torch.einsum("hd,hnd->hn", q[0, :, 0], k[0].repeat_interleave(group, 0))
    z = z / math.sqrt(DIM)
    top = z.max(1).values
    tiles = z.view(HQ, SPLITS, -1, TILE)
    running = tiles.amax(-1).cummax(-1).values
    split_rule = (tiles > running[..., None] - 1).view(HKV, group, -1).any(1).sum(1)
    global_rule = (z > top[:, None] - 1).view(HKV, group, -1).any(1).sum(1)
    lo, hi = top - 1, top.clone()
    for _ in range(60):  # bisection on f(t) = sum [z - t]_+^2 = 1 (beta = 2)
        mid = (lo + hi) / 2
        big = ((z - mid[:, None]).clamp(min=0) ** 2).sum(1) >= 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    support = (z > lo[:, None]).sum(1)
    steps = torch.arange(PIVOTS, dtype=z.dtype) / (PIVOTS - 1)
    pivots = top[:, None] - torch.exp2(-(ALPHA - 1) * math.log2(n) * steps)[None, :]
    k_lo = ((pivots <= lo[:, None]).sum(1) - 1).clamp(0, PIVOTS - 1)
    above_lo = (z > pivots.gather(1, k_lo[:, None])).sum(1)
    return dict(family=family, n=n, split_rule=split_rule.float().mean().item() / n,
                global_rule=global_rule.float().mean().item() / n,
                support_median=support.median().item(), support_max=support.max().item(),
                above_bracket_max=above_lo.max().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072, help="tokens (a multiple of 128 x 128)")
    parser.add_argument("--families", default="iid,planted2,heavy,lowrank_rope",
                        help=f"comma list of {','.join(FAMILIES)}")
    args = parser.parse_args()
    if args.n % (SPLITS * TILE):
        parser.error(f"--n must be a multiple of {SPLITS * TILE}, got {args.n}")
    rows = [counts(f, args.n) for f in args.families.split(",")]
    print(render_table(
        ["family", "N", "candidates, split max", "candidates, global max", "support (median, max)",
         "above level-1 bracket (max)"],
        [[r["family"], str(r["n"]), f"{r['split_rule']:.1%}", f"{r['global_rule']:.2%}",
          f"{r['support_median']:.0f}, {r['support_max']:.0f}", f"{r['above_bracket_max']:.0f}"]
         for r in rows]))


if __name__ == "__main__":
    main()
