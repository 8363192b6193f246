"""Pages a certified step reads at full precision, against the pages that hold the support (CPU).

Issue target: certified mode reads at most twice the pages that hold the true support. For each
data family this runs one certified step (``sparse_decode``, the pure-torch path: pages read are
device-independent) with the read-everything fallback off (``certify_dense_above=1``, so the
bounds themselves are measured), once with the Quest page bounds alone and once with the int8
key sketch re-bounding the pages they keep (``certify_sketch="int8"``), and counts, per KV head,
the pages read and the pages where full entmax gives some query head of the group a nonzero
weight. Every step must come out certified and equal to full entmax (checked).

Data: the synthetic families of :mod:`benchmarks.data_families` and the trained entmax twin's
recorded activations (``real``), B = 1, GQA 32/8, D = 128, float32, alpha 1.5, page 16.

Usage: ``python -m benchmarks.certified_pages --out DIR [--tokens 16384] [--families ...]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.data_families import generate
from benchmarks.report import environment
from entmaxkv_compile import EntmaxKVConfig, sparse_decode
from entmaxkv_compile.metrics import full_entmax_decode, relative_error
from entmaxkv_compile.tables import render_table

FAMILIES = ("planted2", "planted8", "lowrank_rope", "heavy", "iid", "real")
PAGE, ALPHA, HQ, HKV, DIM = 16, 1.5, 32, 8, 128


def support_pages(probs: torch.Tensor, kv_heads: int, page_size: int) -> torch.Tensor:
    """Pages (per batch row and KV head) where some query head of the group has weight > 0."""
    batch, q_heads, n = probs.shape
    pages = -(-n // page_size)
    padded = torch.nn.functional.pad(probs, (0, pages * page_size - n))
    hit = (padded.reshape(batch, kv_heads, q_heads // kv_heads, pages, page_size) > 0).any(-1).any(2)
    return hit.sum(-1)


def measure(family: str, tokens: int, seed: int = 0) -> dict:
    """One family: support pages, and pages read / certified / error per bound configuration."""
    q, k, v = generate(family, 1, HQ, HKV, tokens, DIM, torch.float32, "cpu", seed)
    seqlens = torch.tensor([tokens])
    scale = 1 / math.sqrt(DIM)
    full, probs = full_entmax_decode(q, k, v, seqlens, ALPHA, scale)
    support = int(support_pages(probs, HKV, PAGE).sum())
    row = dict(family=family, tokens=tokens, pages=HKV * (-(-tokens // PAGE)), support_pages=support)
    for sketch in ("off", "int8"):
        config = EntmaxKVConfig(selector="certified", page_size=PAGE, alpha=ALPHA, certify_sketch=sketch,
                                certify_dense_above=1.0)
        start = time.perf_counter()
        result = sparse_decode(q, k, v, seqlens, config, scale=scale, check_values=False)
        read = int(result.num_selected.sum())
        if not bool(result.certified.all()):
            raise AssertionError(f"{family}, sketch {sketch}: a head was not certified")
        row[sketch] = dict(pages_read=read, ratio_to_support=read / max(support, 1),
                           certified=True, rel_error=float(relative_error(result.out, full)),
                           seconds=time.perf_counter() - start)
    return row


def table(rows: list[dict]) -> str:
    columns = ("family", "pages", "support pages", "Quest: read", "Quest: x support",
               "+ int8 sketch: read", "+ int8 sketch: x support")
    cells = [(r["family"], str(r["pages"]), str(r["support_pages"]),
              f"{r['off']['pages_read']} ({100 * r['off']['pages_read'] / r['pages']:.1f}%)",
              f"{r['off']['ratio_to_support']:.2f}",
              f"{r['int8']['pages_read']} ({100 * r['int8']['pages_read'] / r['pages']:.1f}%)",
              f"{r['int8']['ratio_to_support']:.2f}") for r in rows]
    return render_table(columns, cells, right=columns[1:])


def run_record(tokens: int, rows: list[dict]) -> dict:
    """The JSON of a CPU run of these certificate benchmarks: the shapes, the environment
    (:func:`benchmarks.report.environment`) and the rows."""
    return dict(tokens=tokens, alpha=ALPHA, page_size=PAGE, heads=[HQ, HKV], dim=DIM, dtype="float32",
                **environment(torch.device("cpu")), rows=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for certified_pages.json")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of data families")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families.split(","):
        rows.append(measure(family, args.tokens))
        print(f"{family}: {rows[-1]['support_pages']} support pages; read {rows[-1]['off']['pages_read']} "
              f"(Quest), {rows[-1]['int8']['pages_read']} (+ int8 sketch)", flush=True)
    (args.out / "certified_pages.json").write_text(json.dumps(run_record(args.tokens, rows), indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
