"""Tables, markdown and plots of the decode benchmark's JSON (``benchmarks/decode.py``).

The benchmark prints :func:`tables` last, so the end of its output is the summary. Re-render saved
runs (several directories merge, e.g. a full preset split over runs) with

    python -m benchmarks.report OUT [OUT2 ...] [--markdown] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["add_speedups", "environment", "header", "markdown", "plot", "progress", "tables"]

OURS = ("dense", "topk", "gaussian", "gaussian_c", "certified", "certified_s", "certified_d")
KEY = ("family", "batch", "hq", "hkv", "n", "dtype")


def environment(device: torch.device) -> dict:
    """Device, versions and date of a run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(device=name, device_type=device.type, torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def header(meta: dict) -> str:
    copy = f", copy {meta['copy_gbps']:.0f} GB/s" if meta.get("copy_gbps") else ""
    return (f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}{copy} | "
            f"preset {meta.get('preset')} | alpha {meta.get('alpha')} page {meta.get('page_size')}")


def add_speedups(rows: list[dict]) -> None:
    """``speedup`` = SDPA flash ms / this ms, for the rows of one configuration."""
    flash = next((r["ms"] for r in rows if r["method"] == "flash" and r.get("ms")), None)
    for r in rows:
        r["speedup"] = flash / r["ms"] if flash and r.get("ms") else None


def progress(rows: list[dict]) -> str:
    """One line: each method's ms (or FAILED)."""
    parts = []
    for r in rows:
        parts.append(f"{r['method']}={r['ms']:.4f}" if r.get("ms") else f"{r['method']}=FAILED")
    return " ".join(parts)


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[tuple(r.get(k) for k in KEY)][r["method"]] = r
    return groups


def _n(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def tables(meta: dict) -> str:
    """Two plain-text tables: ms (speedup over flash) per method; then pages read / error / certified."""
    groups = _groups(meta["rows"])
    methods = [m for m in ("flash", "cudnn", *OURS) if any(m in g for g in groups.values())]
    lines = [header(meta), "", "ms per step (speedup over SDPA flash); GB/s achieved on the bytes the method must read"]
    head = f"{'family':12s} {'B':>2s} {'heads':>5s} {'dt':4s} {'N':>5s} "
    lines.append(head + " ".join(f"{m:>20s}" for m in methods))
    for key, by in groups.items():
        family, batch, hq, hkv, n, dt = key
        cells = []
        for m in methods:
            r = by.get(m)
            if r is None:
                cells.append(f"{'':>20s}")
            elif not r.get("ms"):
                cells.append(f"{'FAILED':>20s}")
            else:
                cells.append(f"{r['ms']:7.4f} {_fmt(r.get('speedup'), '5.2f')}x {_fmt(r.get('gbps'), '5.0f')}"[:20]
                             .rjust(20))
        lines.append(f"{family:12s} {batch:>2d} {f'{hq}/{hkv}':>5s} {dt:4s} {_n(n):>5s} " + " ".join(cells))
    lines += ["", "ours: pages read / rel. error vs exact full entmax / certified heads"]
    ours = [m for m in OURS if m in methods]
    lines.append(head + " ".join(f"{m:>22s}" for m in ours))
    for key, by in groups.items():
        family, batch, hq, hkv, n, dt = key
        cells = []
        for m in ours:
            r = by.get(m)
            if r is None or not r.get("ms"):
                cells.append(f"{'-' if r is None else 'FAILED':>22s}")
            else:
                cells.append(f"{_fmt(r.get('selected'), '6.1%')} {_fmt(r.get('rel_err'), '7.1e')} "
                             f"{_fmt(r.get('certified'), '4.0%')}".rjust(22))
        lines.append(f"{family:12s} {batch:>2d} {f'{hq}/{hkv}':>5s} {dt:4s} {_n(n):>5s} " + " ".join(cells))
    seen: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in meta["rows"]:
        if r.get("note"):
            seen[(r["method"], r["note"])].append(f"{r['family']} B={r['batch']} {r['hq']}/{r['hkv']} "
                                                  f"{r['dtype']} N={_n(r['n'])}")
    if seen:
        lines += ["", "notes (method: note [where]):"]
        for (method, note), where in seen.items():
            more = f" and {len(where) - 1} more" if len(where) > 1 else ""
            lines.append(f"  {method}: {note} [{where[0]}{more}]")
    if meta.get("skipped"):
        lines.append(f"skipped for time: {len(meta['skipped'])} configurations (see JSON 'skipped')")
    return "\n".join(lines)


def markdown(meta: dict) -> str:
    """RESULTS.md-style tables, one per (batch, heads, dtype, family): ms, speedup, pages, error."""
    out = [f"Device: {meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, CUDA {meta.get('cuda')}, "
           f"{meta['date']}; alpha {meta.get('alpha')}, page {meta.get('page_size')}, top-k "
           f"{meta.get('topk_fraction', 0.03):.0%} of tokens. Cells: ms (speedup over SDPA flash; "
           f"pages read; rel. error vs exact entmax).", ""]
    tables_by: dict[tuple, dict[tuple, dict[str, dict]]] = defaultdict(dict)
    for key, by in _groups(meta["rows"]).items():
        family, batch, hq, hkv, n, dt = key
        tables_by[(batch, hq, hkv, dt, family)][n] = by
    for (batch, hq, hkv, dt, family), by_n in tables_by.items():
        methods = [m for m in ("flash", "cudnn", *OURS) if any(m in by for by in by_n.values())]
        out += [f"#### {family}, B = {batch}, {hq}/{hkv} heads, {dt}", "",
                "| N | " + " | ".join(methods) + " |", "| ---: |" + " ---: |" * len(methods)]
        for n in sorted(by_n):
            cells = []
            for m in methods:
                r = by_n[n].get(m)
                if r is None or not r.get("ms"):
                    cells.append("—" if r is None else "failed")
                elif m in ("flash", "cudnn"):
                    cells.append(f"{r['ms']:.4f}")
                else:
                    cells.append(f"{r['ms']:.4f} ({_fmt(r.get('speedup'), '.2f')}×; {_fmt(r.get('selected'), '.1%')}; "
                                 f"{_fmt(r.get('rel_err'), '.1e')})")
            out.append(f"| {_n(n)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], out_dir: Path) -> list[str]:
    """``speedup_B{b}_{hq}-{hkv}_{dtype}.png``: speedup over flash vs N, one panel per family.

    Returns notes (files written, or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plot skipped: matplotlib is not installed"]
    figures: dict[tuple, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r.get("speedup") and r["method"] != "flash":
            fig_key = (r["batch"], r["hq"], r["hkv"], r["dtype"])
            figures[fig_key][r["family"]][r["method"]].append((r["n"], r["speedup"]))
    notes = []
    for (batch, hq, hkv, dt), families in figures.items():
        cols = min(4, len(families))
        rows_n = -(-len(families) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
        for ax, (family, methods) in zip(axes.flat, families.items()):
            for method, points in sorted(methods.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(family)
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel("speedup over SDPA flash")
        for ax in list(axes.flat)[len(families):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"decode step, B={batch}, {hq}/{hkv} heads, {dt}")
        fig.tight_layout()
        path = out_dir / f"speedup_B{batch}_{hq}-{hkv}_{dt}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        notes.append(f"plot: {path}")
    return notes


def _load(paths: list[Path]) -> dict:
    metas = [json.loads((p / "decode.json" if p.is_dir() else p).read_text()) for p in paths]
    merged = dict(metas[0])
    merged["rows"] = [r for m in metas for r in m["rows"]]
    merged["skipped"] = [s for m in metas for s in m.get("skipped", [])]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="decode.json files or directories holding one")
    parser.add_argument("--markdown", action="store_true", help="print RESULTS.md tables instead")
    parser.add_argument("--plot-dir", type=Path, help="also write the plots here")
    args = parser.parse_args(argv)
    meta = _load(args.paths)
    print(markdown(meta) if args.markdown else tables(meta))
    if args.plot_dir:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        print("\n".join(plot(meta["rows"], args.plot_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
