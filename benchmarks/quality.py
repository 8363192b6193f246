"""Quality of sparse decoding on real activations: the tiny LM twins on held-out stdlib text.

For each context length, held-out window and decode variant, the last ``--queries`` positions of the
window are decoded teacher-forced (``examples/tiny_lm/teacher_forced.py``: exact KV cache, the
variant's own queries through all layers). Variants:

- softmax model: ``softmax full``; ``softmax topk b`` (Quest bounds from
  ``entmaxkv_compile.runtime.select.reference``, softmax over the selected pages) at each KV budget ``b``;
- entmax15 model: ``entmax full`` (``metrics.full_entmax_decode``); ``entmax gaussian`` (adaptive
  budget) and ``entmax certified`` via ``sparse_decode``; ``entmax topk b`` via
  ``select_pages`` + ``paged_decode`` + ``certify`` (the stage references);
- with ``--extra-rankings``, both models also get ``topk-headnorm b`` and ``oracle b`` (see
  :func:`rank_pages`): is a failure of top-k the budget's or the page ranking's?

``matched`` budgets use, per window, the page fraction the entmax gaussian selector read.
End to end: bits per byte, perplexity and next-byte agreement with the same model's full attention.
Per layer and query head (against full attention of the same query): fraction of pages read,
dropped mass delta, support recall, output relative error, certified steps, delta bound.

Run from the repository root (GPU numbers: see benchmarks/QUALITY.md)::

    python -m benchmarks.quality --out out/quality --plots benchmarks/plots
    python -m benchmarks.quality --out /tmp/q --smoke          # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.runtime.attend.reference import paged_decode
from entmaxkv_compile.runtime.certify.reference import certify
from entmaxkv_compile.runtime.decode import sparse_decode
from entmaxkv_compile.metrics import dropped_mass, full_entmax_decode, relative_error, support_recall
from entmaxkv_compile.runtime.select.reference import compact_page_mask, quest_bounds, select_pages, selected_token_mask
from examples.tiny_lm.data import eval_windows, load_split
from examples.tiny_lm.model import TinyLM, load_checkpoint
from examples.tiny_lm.teacher_forced import AttendFn, decode_positions, prefill

MATCHED = "matched"


@dataclass(frozen=True)
class Variant:
    """One decode variant: model family, selector and KV budget (fraction of the window's pages)."""

    family: str  # "softmax" | "entmax"
    selector: str  # "full" | "topk" | "gaussian" | "certified"
    budget: float | str | None = None

    @property
    def name(self) -> str:
        if self.budget is None:
            return f"{self.family} {self.selector}"
        label = self.budget if isinstance(self.budget, str) else f"{100 * self.budget:g}%"
        return f"{self.family} {self.selector} {label}"


def variants(family: str, budgets: list[float], extra_rankings: bool) -> list[Variant]:
    """The variants of one model family, in evaluation order (gaussian before ``matched``)."""
    rankers = ("topk", "topk-headnorm", "oracle") if extra_rankings else ("topk",)
    topk = [Variant(family, r, b) for r in rankers for b in budgets] + [Variant(family, "topk", MATCHED)]
    if family == "softmax":
        return [Variant(family, "full")] + topk
    return [Variant(family, "full"), Variant(family, "gaussian"), Variant(family, "certified")] + topk


@dataclass
class Tally:
    """Sums over decode steps for one (model, context, variant)."""

    layers: int
    heads: int
    nll: float = 0.0
    agree: int = 0
    correct: int = 0
    steps: int = 0
    per_head: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled_err: list[float] = field(default_factory=list)

    def add_head(self, key: str, layer: int, values: torch.Tensor) -> None:
        """Add per-(step, head) values ``[B, Hq]`` to the per-(layer, head) sum of ``key``."""
        table = self.per_head.setdefault(key, torch.zeros(self.layers, self.heads, dtype=torch.float64))
        table[layer] += values.double().sum(0).cpu()

    def read_sum(self) -> float:
        """Sum of the pages-read fractions recorded so far (all layers and heads)."""
        table = self.per_head.get("pages_read")
        return 0.0 if table is None else float(table.sum())

    def summary(self) -> dict:
        """End-to-end scores and per-head metric means (per layer and head, and over all of them)."""
        out = {"steps": self.steps, "bits_per_byte": self.nll / max(1, self.steps) / math.log(2),
               "perplexity": math.exp(self.nll / max(1, self.steps)),
               "agreement": self.agree / max(1, self.steps), "accuracy": self.correct / max(1, self.steps)}
        if self.per_head:
            layer_head = {k: (v / self.steps).tolist() for k, v in self.per_head.items()}
            out.update({k: float(torch.tensor(v).mean()) for k, v in layer_head.items()})
            if self.pooled_err:
                out["pooled_rel_err"] = sum(self.pooled_err) / len(self.pooled_err)
            out["per_layer_head"] = layer_head
        return out


def budget_tokens(fraction: float, context: int, page_size: int) -> int:
    """Token budget of ``fraction`` of a ``context``-token window: whole pages, at least one."""
    pages = max(1, round(fraction * context / page_size))
    return pages * page_size


def row_rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||out - ref|| / ||ref||`` per (step, head): ``[B, Hq]`` (metrics.relative_error, row-wise)."""
    diff = (out.double() - ref.double()).norm(dim=-1).squeeze(-1)
    norm = ref.double().norm(dim=-1).squeeze(-1)
    return diff / torch.where(norm > 0, norm, 1.0)


def pages_read(num_selected: torch.Tensor, seqlens: torch.Tensor, page_size: int, group: int) -> torch.Tensor:
    """Fraction of the sequence's valid pages each query head read: ``[B, Hq]``."""
    valid = (seqlens + page_size - 1) // page_size
    return (num_selected.double() / valid[:, None].double()).repeat_interleave(group, dim=1)


def softmax_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, scale: float,
    slopes: torch.Tensor, token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax decode attention over the valid (and, if given, selected) tokens: (out, probs ``[B, Hq, N]``)."""
    group = q.shape[1] // k_cache.shape[1]
    k = k_cache.float().repeat_interleave(group, dim=1)
    v = v_cache.float().repeat_interleave(group, dim=1)
    rows = torch.arange(k.shape[2], device=q.device)
    rel = (rows[None, :] - (seqlens[:, None] - 1)).float()
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k) * scale + slopes[None, :, None] * rel[:, None, :]
    keep = (rel <= 0)[:, None, :]
    if token_mask is not None:
        keep = keep & token_mask.repeat_interleave(group, dim=1)
    probs = torch.softmax(torch.where(keep, scores, float("-inf")), dim=-1)
    return torch.einsum("bhn,bhnd->bhd", probs, v)[:, :, None, :], probs


def rank_pages(
    ranking: str, q: torch.Tensor, stats: KVPageStats, seqlens: torch.Tensor, p_full: torch.Tensor,
    tokens_budget: int, page_size: int, scale: float, slopes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-budget page choice per KV head: ``(page_indices, num_selected)``.

    ``topk``: the library's Quest top-k (``select_pages``; a KV head ranks pages by its query
    group's largest bound). ``topk-headnorm``: Quest bounds taken relative to each query head's own
    best page before the group maximum, so a head with small scores (ALiBi) is not outranked by one
    with large scores (NoPE). ``oracle``: the true full-attention page mass (group maximum), the best
    any fixed-budget page ranking can do. The last valid page is always kept, as in the library.
    """
    if ranking == "topk":
        return select_pages(
            q, *stats.buffers(), seqlens, page_size=page_size, alpha=1.5, scale=scale, selector="topk",
            token_budget=tokens_budget, max_quantile=0.99, margin=0.0, tau_estimate="auto", sink_pages=0,
            recent_pages=0, min_context=0, alibi_slopes=slopes)
    batch, q_heads = q.shape[:2]
    kv_heads, num_pages = stats.kmin.shape[1], stats.num_pages
    if ranking == "topk-headnorm":
        bounds = quest_bounds(q, stats.kmin, stats.kmax, seqlens, page_size=page_size, scale=scale,
                              alibi_slopes=slopes)
        score = bounds - bounds.amax(-1, keepdim=True)
    elif ranking == "oracle":
        padded = torch.nn.functional.pad(p_full, (0, num_pages * page_size - p_full.shape[-1]))
        score = padded.view(batch, q_heads, num_pages, page_size).sum(-1)
    else:
        raise ValueError(f"ranking must be topk, topk-headnorm or oracle, got {ranking!r}")
    score = score.view(batch, kv_heads, -1, num_pages).amax(2)
    pages = torch.arange(num_pages, device=q.device)
    valid_pages = (seqlens + page_size - 1) // page_size
    score = torch.where(pages[None, None, :] == valid_pages[:, None, None] - 1, float("inf"), score)
    top = score.topk(min(tokens_budget // page_size, num_pages), dim=-1).indices
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
    return compact_page_mask(chosen & (pages[None, None, :] < valid_pages[:, None, None]))


def make_attend(
    variant: Variant, model: TinyLM, stats: list[KVPageStats], tally: Tally, tokens_budget: int | None,
    page_size: int,
) -> AttendFn:
    """The ``attend`` callback of ``decode_positions`` for ``variant``; records per-head metrics."""
    alpha, scale, slopes = model.cfg.alpha, model.scale, model.slopes
    group = model.cfg.n_heads // model.cfg.n_kv_heads

    def record(layer, out, out_full, p_full, page_indices, num_selected, seqlens):
        sel = selected_token_mask(page_indices, num_selected, seqlens, page_size=page_size,
                                  max_seqlen=p_full.shape[-1])
        tally.add_head("pages_read", layer, pages_read(num_selected, seqlens, page_size, group))
        tally.add_head("dropped_mass", layer, dropped_mass(p_full, sel))
        tally.add_head("rel_err", layer, row_rel_err(out, out_full))
        tally.pooled_err.append(float(relative_error(out, out_full)))
        return sel

    def record_support(layer, p_full, seqlens):
        """Size of the full-entmax support: share of the valid tokens and of the valid pages holding it."""
        num_pages = -(-p_full.shape[-1] // page_size)
        padded = torch.nn.functional.pad(p_full, (0, num_pages * page_size - p_full.shape[-1]))
        pages_hit = (padded.view(*p_full.shape[:2], num_pages, page_size) > 0).any(-1).sum(-1)
        valid_pages = (seqlens + page_size - 1) // page_size
        tally.add_head("support_tokens", layer, (p_full > 0).sum(-1) / seqlens[:, None])
        tally.add_head("support_pages", layer, pages_hit / valid_pages[:, None])

    def attend_softmax(layer, q, k_cache, v_cache, seqlens):
        out_full, p_full = softmax_attention(q, k_cache, v_cache, seqlens, scale, slopes)
        if variant.selector == "full":
            return out_full
        page_indices, num_selected = rank_pages(variant.selector, q, stats[layer], seqlens, p_full, tokens_budget,
                                                page_size, scale, slopes)
        sel = selected_token_mask(page_indices, num_selected, seqlens, page_size=page_size,
                                  max_seqlen=k_cache.shape[2])
        out, _ = softmax_attention(q, k_cache, v_cache, seqlens, scale, slopes, token_mask=sel)
        record(layer, out, out_full, p_full, page_indices, num_selected, seqlens)
        return out

    def attend_entmax(layer, q, k_cache, v_cache, seqlens):
        out_full, p_full = full_entmax_decode(q, k_cache, v_cache, seqlens, alpha, scale, slopes)
        if variant.selector == "full":
            record_support(layer, p_full, seqlens)
            return out_full
        st = stats[layer]
        if variant.selector in ("gaussian", "certified"):
            cfg = EntmaxKVConfig(selector=variant.selector, page_size=page_size, alpha=alpha)
            res = sparse_decode(q, k_cache, v_cache, seqlens, cfg, st, slopes, scale, check_values=False)
            out, page_indices, num_selected = res.out, res.page_indices, res.num_selected
            certified, delta_bound = res.certified, res.delta_bound
        else:
            page_indices, num_selected = rank_pages(variant.selector, q, st, seqlens, p_full, tokens_budget,
                                                    page_size, scale, slopes)
            kw = dict(page_size=page_size, alpha=alpha, scale=scale, alibi_slopes=slopes)
            out, tau = paged_decode(q, k_cache, v_cache, seqlens, page_indices, num_selected, **kw)
            certified, delta_bound = certify(q, st.kmin, st.kmax, seqlens, page_indices, num_selected, tau, **kw)
        sel = record(layer, out, out_full, p_full, page_indices, num_selected, seqlens)
        measured = dropped_mass(p_full, sel)
        tally.add_head("support_recall", layer, support_recall(p_full, sel))
        tally.add_head("certified", layer, certified.double())
        tally.add_head("delta_bound", layer, delta_bound.double())
        tally.add_head("bound_holds", layer, (delta_bound.double() >= measured.double() - 1e-5).double())
        return out

    return attend_softmax if variant.family == "softmax" else attend_entmax


@torch.no_grad()
def evaluate_context(
    model: TinyLM, family: str, context: int, windows: list[tuple[str, torch.Tensor]], args: argparse.Namespace,
    gaussian_frac: dict[tuple[int, int], float],
) -> dict:
    """Every variant of ``family`` on the windows of one context: ``{variant name: summary}``.

    Stops taking new windows once ``args.stop_at`` (a ``perf_counter`` time) has passed; the number
    of windows used is in each summary.
    """
    cfg = model.cfg
    tallies: dict[str, Tally] = {}
    used = 0
    for w, (_, tokens) in enumerate(windows):
        if time.perf_counter() > args.stop_at:
            print(f"[{family}] context {context}: time limit reached after {used} windows", flush=True)
            break
        tokens = tokens.to(args.device)
        t0 = time.perf_counter()
        logits_full, caches = prefill(model, tokens[:-1], chunk=args.chunk)
        positions = torch.arange(context - args.queries, context, device=args.device)
        seqlens = positions + 1
        targets, reference = tokens[positions + 1], logits_full[positions].argmax(-1)
        stats = [KVPageStats.from_cache(k.expand(len(positions), -1, -1, -1), seqlens, args.page_size,
                                        check_values=False) for k, _ in caches]
        for variant in variants(family, args.budgets, args.extra_rankings):
            frac = gaussian_frac.get((context, w)) if variant.budget == MATCHED else variant.budget
            if variant.budget == MATCHED and frac is None:
                continue
            tally = tallies.setdefault(variant.name, Tally(cfg.n_layers, cfg.n_heads))
            budget = budget_tokens(frac, context, args.page_size) if frac is not None else None
            read_before = tally.read_sum()
            attend = make_attend(variant, model, stats, tally, budget, args.page_size)
            logits = decode_positions(model, tokens, caches, positions, attend)
            tally.nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            tally.agree += int((logits.argmax(-1) == reference).sum())
            tally.correct += int((logits.argmax(-1) == targets).sum())
            tally.steps += len(positions)
            if variant.selector == "gaussian":
                share = (tally.read_sum() - read_before) / (len(positions) * cfg.n_layers * cfg.n_heads)
                gaussian_frac[(context, w)] = share
        used += 1
        print(f"[{family}] context {context} window {w + 1}/{len(windows)}: {time.perf_counter() - t0:.1f}s",
              flush=True)
    return {name: {**t.summary(), "windows": used} for name, t in tallies.items()}


# (table header, summary key, multiplier)
COLUMNS = [
    ("pages read %", "pages_read", 100.0), ("bits/byte", "bits_per_byte", 1.0), ("ppl", "perplexity", 1.0),
    ("agree %", "agreement", 100.0), ("dropped δ", "dropped_mass", 1.0), ("recall", "support_recall", 1.0),
    ("rel err", "rel_err", 1.0), ("support tokens %", "support_tokens", 100.0),
    ("support pages %", "support_pages", 100.0), ("certified %", "certified", 100.0),
    ("δ bound", "delta_bound", 1.0), ("bound holds %", "bound_holds", 100.0),
]


def markdown_tables(results: dict) -> str:
    """One table per context: every variant of both models, means over steps, layers and heads."""
    lines = []
    contexts = sorted({int(c) for fam in results.values() for c in fam})
    for context in contexts:
        lines += [f"\n#### context {context}\n", "| variant | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for family in results.values():
            for name, summary in family.get(str(context), family.get(context, {})).items():
                cells = []
                for _, key, mult in COLUMNS:
                    value = summary.get(key)
                    cells.append("–" if value is None else f"{mult * value:.4g}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curve(ctx_results: dict, family: str, ranking: str, key: str) -> tuple[list[float], list[float]]:
    pts = sorted((s["pages_read"], s[key]) for n, s in ctx_results.items()
                 if n.startswith(f"{family} {ranking} "))
    return [100 * x for x, _ in pts], [y for _, y in pts]


def plot_all(results: dict, plot_dir: Path, prefix: str = "quality") -> list[Path]:
    """PNG curves (ppl, dropped mass, output error vs pages read) and per-layer/head maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict] = {}
    for family in results.values():
        for ctx, res in family.items():
            merged.setdefault(str(ctx), {}).update(res)
    contexts = sorted(merged, key=int)
    written = []
    for key, label, fname, logy in [("perplexity", "perplexity (bytes)", f"{prefix}_ppl.png", True),
                                    ("dropped_mass", "dropped mass δ (mean)", f"{prefix}_dropped_mass.png", True),
                                    ("rel_err", "output relative error (mean)", f"{prefix}_rel_error.png", True)]:
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            res = merged[ctx]
            for family, color in (("softmax", "tab:blue"), ("entmax", "tab:red")):
                for ranking, style in (("topk", "o-"), ("topk-headnorm", "^--"), ("oracle", "v:")):
                    xs, ys = _curve(res, family, ranking, key)
                    if xs:
                        ax.plot(xs, ys, style, color=color, label=f"{family} {ranking}")
                full = res.get(f"{family} full")
                if key == "perplexity" and full:
                    ax.axhline(full[key], color=color, ls="--", label=f"{family} full")
            for name, style in (("entmax gaussian", "k*"), ("entmax certified", "gs")):
                if name in res and key in res[name]:
                    ax.plot(100 * res[name]["pages_read"], res[name][key], style, ms=11, label=name)
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("KV pages read (%)")
            ax.set_ylabel(label)
            ax.set_title(f"context {ctx}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_dir / fname, dpi=110)
        plt.close(fig)
        written.append(plot_dir / fname)

    ctx = contexts[-1]
    panels = [("entmax full", "support_pages", "full entmax: pages holding support"),
              ("entmax gaussian", "pages_read", "gaussian: pages read"),
              ("entmax gaussian", "dropped_mass", "gaussian: dropped δ"),
              ("entmax gaussian", "certified", "gaussian: steps certified"),
              ("entmax certified", "pages_read", "certified: pages needed")]
    panels = [p for p in panels if p[1] in merged[ctx].get(p[0], {}).get("per_layer_head", {})]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (name, key, title) in zip(axes[0], panels):
            grid = torch.tensor(merged[ctx][name]["per_layer_head"][key])
            im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
            ax.set_xlabel("query head (even: ALiBi, odd: NoPE)")
            ax.set_ylabel("layer")
            ax.set_title(f"{title} ({ctx})", fontsize=9)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(plot_dir / f"{prefix}_layer_head.png", dpi=110)
        plt.close(fig)
        written.append(plot_dir / f"{prefix}_layer_head.png")

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, summary in merged[ctx].items():
        if "delta_bound" in summary and not name.endswith("certified"):
            per = summary["per_layer_head"]
            xs = torch.tensor(per["dropped_mass"]).flatten().clamp(min=1e-7)
            ys = torch.tensor(per["delta_bound"]).flatten().clamp(min=1e-7)
            ax.scatter(xs.numpy(), ys.numpy(), s=10, label=name)
    ax.plot([1e-7, 1], [1e-7, 1], "k--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured dropped mass δ (per layer/head mean)")
    ax.set_ylabel("certificate δ bound (per layer/head mean)")
    ax.set_title(f"entmax, context {ctx}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(plot_dir / f"{prefix}_delta_bound.png", dpi=110)
    plt.close(fig)
    written.append(plot_dir / f"{prefix}_delta_bound.png")
    return written


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entmax-ckpt", type=Path, default=Path("examples/tiny_lm/tiny_lm_entmax15.safetensors"))
    p.add_argument("--softmax-ckpt", type=Path, default=Path("examples/tiny_lm/tiny_lm_softmax.safetensors"))
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--windows", type=int, default=8, help="held-out windows (files) per context")
    p.add_argument("--queries", type=int, default=256, help="decode steps per window (its last positions)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.10, 0.25])
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=2048, help="query rows per attention block in the prefill")
    p.add_argument("--out", type=Path, required=True, help="directory for results.json and tables.md")
    p.add_argument("--plots", type=Path, default=None, help="directory for the PNG plots (default: --out)")
    p.add_argument("--extra-rankings", action="store_true",
                   help="also run the topk-headnorm and oracle page rankings at every budget")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="start no new window after this many seconds (partial results are kept)")
    p.add_argument("--plot-prefix", default="quality", help="file name prefix of the plots")
    p.add_argument("--from-results", type=Path, default=None,
                   help="re-render tables and plots from an earlier results.json instead of evaluating")
    p.add_argument("--drop-variants", nargs="*", default=[],
                   help="with --from-results: leave out variants whose name contains any of these strings")
    p.add_argument("--smoke", action="store_true", help="tiny contexts and few steps, for a CPU check")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.from_results:
        results = json.loads(args.from_results.read_text())["results"]
        results = {family: {ctx: {name: summary for name, summary in res.items()
                                  if not any(drop in name for drop in args.drop_variants)}
                            for ctx, res in ctx_results.items()}
                   for family, ctx_results in results.items()}
        write_reports(results, args)
        return
    if args.smoke:
        args.contexts, args.windows, args.queries, args.chunk = [256], 1, 4, 128
    if args.queries < 1 or any(c <= args.queries for c in args.contexts):
        raise ValueError(f"--queries must be >= 1 and below every context, got {args.queries} and {args.contexts}")
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    _, held_out = load_split()
    windows = {c: eval_windows(held_out, c + 1, args.windows) for c in args.contexts}
    t0 = time.perf_counter()
    args.stop_at = t0 + (args.time_limit_s if args.time_limit_s else float("inf"))
    models, meta_models = {}, {}
    for family, path in (("entmax", args.entmax_ckpt), ("softmax", args.softmax_ckpt)):
        if not path.is_file():
            print(f"{family} checkpoint {path} not found: skipping the {family} model", flush=True)
            continue
        model, meta = load_checkpoint(path)
        models[family] = model.to(args.device)
        meta_models[family] = {"path": str(path), **meta}
    meta = {"device": torch.cuda.get_device_name() if args.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "compute_dtype": "float32 (no TF32)",
            "page_size": args.page_size, "queries_per_window": args.queries, "budgets": args.budgets,
            "extra_rankings": args.extra_rankings,
            "windows": {c: [rel for rel, _ in w] for c, w in windows.items()}, "models": meta_models}
    results: dict[str, dict] = {family: {} for family in models}
    gaussian_frac: dict[tuple[int, int], float] = {}
    for context in args.contexts:
        for family, model in models.items():  # entmax first: it sets the matched budgets
            summary = evaluate_context(model, family, context, windows[context], args, gaussian_frac)
            if summary:
                results[family][context] = summary
            meta["seconds"] = time.perf_counter() - t0
            if args.device.type == "cuda":
                meta["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_reports(results, args)


def write_reports(results: dict, args: argparse.Namespace) -> None:
    """``tables.md`` in ``--out`` and the PNG plots in ``--plots`` (default ``--out``)."""
    args.out.mkdir(parents=True, exist_ok=True)
    tables = markdown_tables(results)
    (args.out / "tables.md").write_text(tables)
    print(tables)
    for path in plot_all(results, args.plots or args.out, args.plot_prefix):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
