"""How many pages could each candidate upper bound clear from the exact entmax support? (CPU, float64)

A certified decode step may skip page ``p`` for query head ``h`` only if an upper bound ``UB_p`` of
the page's scores ``z = (alpha-1) * scale * q.k`` satisfies ``UB_p <= tau`` (the exact threshold):
then every token of the page gets probability 0. This script measures, per query head, the exact
``tau`` over all tokens, each page's true max ``z``, and each bound family's per-page ``UB``, and
reports how many pages each bound clears against how many pages truly hold no support.

Bound families (all valid upper bounds of every key's ``q.k`` in the page; ``scale`` and
``alpha - 1`` are applied afterwards):

- ``box``: Quest's per-channel min/max, ``sum_d max(q_d lo_d, q_d hi_d)``;
- ``ball``: about the box midpoint ``mid``, ``q.mid + ||q|| r_mid`` with ``r_mid = max_i ||k_i - mid||``;
- ``min(box,ball)``: the pointwise minimum of the two;
- ``int8`` / ``int4``: per-token symmetric quantisation in groups of 32 channels with absmax scale
  ``s_g``; ``UB_i = q.k_hat_i + sum_g (s_g / 2) sum_{d in g} |q_d|``, max over the page;
- ``rank32``: per-KV-head PCA of the keys (mean ``mu``, top-32 basis ``U``); with
  ``k = mu + U k' + r``, ``UB_i = q.mu + (U^T q).k'_i + ||q_perp|| ||r_i||``, max over the page.
  The basis is fitted on the same keys it bounds (an online cache would fit it on a prefix).

Costs are stated in fp16 storage bytes per page per KV head; the measurement itself is float64.
Data: the synthetic families of :mod:`benchmarks.data_families` and the trained entmax twin of
``examples/tiny_lm`` (its 12 recorded KV heads at 16384 tokens, native head dim 64, 4 distinct NoPE
queries per KV head from the last 4 positions: all of them for KV head 0 of a layer, 4 of the 8 for
KV head 1, in ``torch.unique`` order).

Usage: ``python -m benchmarks.bound_margins --out DIR [--tokens 16384 65536] [--hq 32 --hkv 8]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from entmaxkv_compile.math.reference import entmax_threshold

__all__ = ["BOUNDS", "SYNTHETIC", "page_bounds", "measure", "bytes_per_page", "main"]

PAGE = 16
ALPHA = 1.5
RANK = 32
GROUP = 32
BOUNDS = ("box", "ball", "min(box,ball)", "int8", "int4", "rank32")
SYNTHETIC = ("iid", "planted0.5", "planted2", "planted8", "heavy", "lowrank_rope")


def _quant_bound(q: torch.Tensor, k: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-token UB of ``q.k`` from a group-32 absmax quantisation of ``k`` to ``+-levels``.

    ``q [H, D]``, ``k [N, D]`` -> ``[H, N]``. Rounding to the nearest level errs by at most half a
    step per coordinate, so ``|q.(k - k_hat)| <= sum_g (s_g / 2) sum_{d in g} |q_d|``.
    """
    n, d = k.shape
    groups = k.reshape(n, d // GROUP, GROUP)
    step = groups.abs().amax(-1, keepdim=True) / levels  # [N, G, 1]
    safe = torch.where(step > 0, step, torch.ones_like(step))
    k_hat = (torch.round(groups / safe) * step).reshape(n, d)
    qabs = q.abs().reshape(q.shape[0], d // GROUP, GROUP).sum(-1)  # [H, G]
    return q @ k_hat.T + (qabs @ step[..., 0].T) / 2


def _rank_bound(q: torch.Tensor, k: torch.Tensor, rank: int) -> torch.Tensor:
    """Per-token UB of ``q.k`` from a rank-``rank`` PCA projection plus the residual norm."""
    mu = k.mean(0)
    centred = k - mu
    _, vecs = torch.linalg.eigh(centred.T @ centred)
    basis = vecs[:, -rank:]  # [D, r], top eigenvectors
    coords = centred @ basis
    resid = (centred - coords @ basis.T).norm(dim=1)  # [N]
    q_par = q @ basis  # [H, r]
    q_perp = (q - q_par @ basis.T).norm(dim=1)  # [H]
    return (q @ mu)[:, None] + q_par @ coords.T + q_perp[:, None] * resid[None, :]


def page_bounds(q: torch.Tensor, k: torch.Tensor, page: int = PAGE) -> dict[str, torch.Tensor]:
    """Upper bounds of each page's max ``q.k`` (raw dot products, no scale), per bound family.

    Args:
        q: ``[H, D]`` the query heads that read this KV head.
        k: ``[N, D]`` keys with ``N`` a multiple of ``page`` and ``D`` a multiple of 32.

    Returns:
        ``{"true": [H, P], **{bound: [H, P]}}`` with ``P = N / page``.
    """
    n, d = k.shape
    if n % page or d % GROUP:
        raise ValueError(f"k must be [N, D] with N % {page} == 0 and D % {GROUP} == 0, got {tuple(k.shape)}")
    pages = k.reshape(n // page, page, d)
    lo, hi = pages.amin(1), pages.amax(1)
    mid = (lo + hi) / 2
    r_mid = (pages - mid[:, None]).norm(dim=2).amax(1)  # [P]
    box = torch.maximum(q[:, None] * lo, q[:, None] * hi).sum(-1)
    ball = q @ mid.T + q.norm(dim=1, keepdim=True) * r_mid
    per_page = lambda tok: tok.reshape(q.shape[0], n // page, page).amax(-1)  # noqa: E731
    return {
        "true": per_page(q @ k.T),
        "box": box,
        "ball": ball,
        "min(box,ball)": torch.minimum(box, ball),
        "int8": per_page(_quant_bound(q, k, 127)),
        "int4": per_page(_quant_bound(q, k, 7)),
        "rank32": per_page(_rank_bound(q, k, min(RANK, d))),
    }


def bytes_per_page(d: int, pages: int) -> dict[str, float]:
    """fp16 storage bytes per page per KV head for each bound family (``pages`` amortises the basis)."""
    scales = d // GROUP * 2
    return {
        "box": 2 * d * 2,
        "ball": 2 * d * 2 + 4,  # the midpoint comes from the box; r_mid is one more scalar
        "min(box,ball)": 2 * d * 2 + 4,
        "int8": (d + scales) * PAGE,
        "int4": (d // 2 + scales) * PAGE,
        "rank32": (RANK * 2 + 4) * PAGE + (RANK * d + d) * 2 / pages,
    }


def measure(q: torch.Tensor, k: torch.Tensor, scale: float, alpha: float = ALPHA) -> dict[str, dict]:
    """Per-bound statistics over the query heads ``q [Hkv, G, D]`` reading keys ``k [Hkv, N, D]``.

    For every (query head, page): clearable = UB <= tau, no-support = true max <= tau; margin and
    slack in units of the std of that query's ``z`` over all tokens. ``gqa_clearable`` counts a page
    only when it is clearable for all G heads sharing its KV head (what a GQA kernel can skip).
    """
    c = (alpha - 1) * scale
    acc: dict[str, list] = {}
    for j in range(k.shape[0]):
        qj, kj = q[j].double(), k[j].double()
        z = c * (qj @ kj.T)
        tau = entmax_threshold(z / (alpha - 1), alpha=alpha, dim=-1)[:, None]  # [G, 1]
        std = z.std(dim=1, keepdim=True)
        ub = {name: c * v for name, v in page_bounds(qj, kj).items()}
        true = ub.pop("true")
        slack_tol = 1e-9 * (1 + true.abs())
        for name, v in ub.items():
            if bool((v < true - slack_tol).any()):
                raise AssertionError(f"bound {name} fell below a page's true max on KV head {j}")
        acc.setdefault("_nosupport", []).append((true <= tau).double())
        acc.setdefault("_gqa_nosupport", []).append((true <= tau).all(0).double())
        acc.setdefault("_margin", []).append(((tau - true) / std).flatten())
        for name, v in ub.items():
            acc.setdefault(name, []).append((v <= tau).double())
            acc.setdefault(name + "/gqa", []).append((v <= tau).all(0).double())
            acc.setdefault(name + "/slack", []).append(((v - true) / std).flatten())
    nosup = torch.cat([t.flatten() for t in acc["_nosupport"]]).mean().item()
    gqa_nosup = torch.cat(acc["_gqa_nosupport"]).mean().item()
    out = {"no_support": nosup, "gqa_no_support": gqa_nosup,
           "median_margin_std": torch.cat(acc["_margin"]).median().item(), "bounds": {}}
    for name in BOUNDS:
        clear = torch.cat([t.flatten() for t in acc[name]]).mean().item()
        gqa = torch.cat(acc[name + "/gqa"]).mean().item()
        out["bounds"][name] = {
            "clearable": clear,
            "clearable_over_no_support": clear / nosup if nosup > 0 else float("nan"),
            "gqa_clearable": gqa,
            "median_slack_std": torch.cat(acc[name + "/slack"]).median().item(),
        }
    return out


def _synthetic(family: str, n: int, hq: int, hkv: int, d: int, seed: int):
    from benchmarks.data_families import generate

    q, k, _ = generate(family, 1, hq, hkv, n, d, torch.float32, "cpu", seed)
    return q[0, :, 0].reshape(hkv, hq // hkv, d), k[0], 1 / math.sqrt(d)


def _twin(context: int):
    """The tiny_lm entmax twin's 12 recorded KV heads at ``context`` tokens, native head dim 64."""
    from benchmarks.real_activations import record

    rq, rk, _ = record(context, "cpu")
    qs = [torch.unique(rq[i], dim=0) for i in range(rq.shape[0])]  # drop the padding repeats
    g = min(t.shape[0] for t in qs)
    return torch.stack([t[:g] for t in qs]), rk, 1 / math.sqrt(rk.shape[-1]), g


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names)), 5))
    width = 0.8 / (len(BOUNDS) + 1)
    for i, bound in enumerate(BOUNDS):
        vals = [100 * results[f]["bounds"][bound]["clearable"] for f in names]
        ax.bar([x + i * width for x in range(len(names))], vals, width, label=bound)
    ax.bar([x + len(BOUNDS) * width for x in range(len(names))],
           [100 * results[f]["no_support"] for f in names], width, label="no support (ceiling)",
           color="black", alpha=0.35)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=20, fontsize=8)
    ax.set_ylabel("pages clearable, % (per query head)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Pages each bound proves outside the entmax support\n(alpha={ALPHA}, page {PAGE}, CPU float64)", fontsize=10)
    ax.legend(fontsize=7, ncol=7, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict, costs: dict) -> str:
    lines = ["| data | bound | B/page/head | clearable % | GQA clearable % | no support % | clearable / no-support | median margin /σ | median slack /σ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fam, r in results.items():
        for b in BOUNDS:
            s = r["bounds"][b]
            lines.append(f"| {fam} | {b} | {costs[fam][b]:.0f} | {100 * s['clearable']:.2f} | "
                         f"{100 * s['gqa_clearable']:.2f} | {100 * r['no_support']:.2f} | "
                         f"{s['clearable_over_no_support']:.3f} | {r['median_margin_std']:.2f} | "
                         f"{s['median_slack_std']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bound_margins.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default OUT/bound_margins.png)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--hq", type=int, default=32)
    parser.add_argument("--hkv", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--families", nargs="+", default=list(SYNTHETIC))
    parser.add_argument("--no-twin", action="store_true", help="skip the tiny_lm twin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--twin-context", type=int, default=16384,
                        help="tokens of the twin's recording (16384, its longest evaluated context)")
    parser.add_argument("--replot", type=Path, default=None,
                        help="only re-render the table and plot from an existing bound_margins.json")
    args = parser.parse_args(argv)
    if args.replot is not None:
        payload = json.loads(args.replot.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        print(_table(payload["results"], payload["bytes_per_page_per_head"]))
        _plot(payload["results"], args.plot or args.out / "bound_margins.png")
        return payload
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results, costs, setup = {}, {}, {}
    start = time.perf_counter()
    for n in args.tokens:
        for fam in args.families:
            q, k, scale = _synthetic(fam, n, args.hq, args.hkv, args.dim, args.seed)
            key = f"{fam} N={n}"
            results[key] = measure(q, k, scale)
            costs[key] = bytes_per_page(args.dim, n // PAGE)
            setup[key] = {"N": n, "Hq": args.hq, "Hkv": args.hkv, "D": args.dim}
            print(f"{key}: {time.perf_counter() - start:.1f} s", flush=True)
    if not args.no_twin:
        q, k, scale, g = _twin(args.twin_context)
        key = f"tiny_lm twin N={k.shape[1]}"
        results[key] = measure(q, k, scale)
        costs[key] = bytes_per_page(k.shape[-1], k.shape[1] // PAGE)
        setup[key] = {"N": k.shape[1], "Hq": g * k.shape[0], "Hkv": k.shape[0], "D": k.shape[-1]}
        print(f"{key}: {time.perf_counter() - start:.1f} s", flush=True)
    table = _table(results, costs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"alpha": ALPHA, "page": PAGE, "rank": RANK, "quant_group": GROUP, "setup": setup,
               "bytes_per_page_per_head": costs, "results": results,
               "seconds": time.perf_counter() - start}
    (args.out / "bound_margins.json").write_text(json.dumps(payload, indent=1))
    _plot(results, args.plot or args.out / "bound_margins.png")
    return payload


if __name__ == "__main__":
    main()
