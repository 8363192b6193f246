"""End-to-end decode: a compiled gpt-fast-style entmax model, ms/token, ours against the baselines.

The model is ``examples/zoo/gpt_fast.py`` (static KV cache, RoPE, entmax15 attention written the
plain way) with ``--layers`` >= 4, bf16. Its caches are filled directly, without a prefill, with
planted-span keys (:func:`benchmarks.data_families.planted`, 2% of the pages): the spans of layer
``l`` are aligned with layer ``l``'s own mean query of each KV head at the first decode step,
computed by one eager step whose pre-hooks fill each layer's cache just before it attends. Every
method then starts from a copy of those caches and decodes the same fixed token ``--steps`` times
(teacher-forced, so all methods see the same inputs; RoPE rotates the queries by a few positions
over the run). Methods:

- ``exact``: the uncompiled model (dense sort-based entmax over the cache): the logit reference;
- ``inductor``: the same model, ``torch.compile(mode="reduce-overhead")``, plain Inductor;
- ``sdpa_flash``: its softmax twin (same weights), attention through SDPA on the flash backend
  over the whole static buffer (flash takes no mask; the buffer holds the context plus the decoded
  steps, all filled, so it reads what a masked decode would), compiled the same way; its logit
  error is against the same twin uncompiled;
- ``entmaxkv_<selector>``: ``torch.compile(backend="entmaxkv")`` with that selector and the same
  mode (top-k keeps 3% of the tokens).

Plain-Inductor and SDPA baselines run for all contexts before the entmaxkv backend is first used:
importing it installs tracing polyfills that would change what "plain Inductor" compiles.
ms/token is wall time over the timed steps (host overhead included, as a user's loop sees it).
``--positions device`` (default) feeds ``input_pos`` from a GPU tensor as gpt-fast's loop does, so
the host runs ahead of the device; ``--positions host`` builds it from a Python int each step,
which waits for the queued work, so host time per step adds to device time (``position_feed``).

    python benchmarks/e2e.py --preset quick --out OUT    # H200: 32k, 128k; gaussian, certified
    python benchmarks/e2e.py --preset full --out OUT     # + 512k, + topk and dense, 32 steps
    python benchmarks/e2e.py --preset smoke --out OUT    # CPU plumbing check (no Inductor)

Methods not started within the preset's time budget (``--budget-s``; quick: 225 s, so that the
run ends in about 4 minutes) are skipped with a note; the warm-up seconds of each row (compilation
and graph recording) show where the time went. Writes ``OUT/e2e.json``; the last lines printed are
the summary table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report  # noqa: E402
from benchmarks.data_families import planted  # noqa: E402
from examples.zoo import gpt_fast  # noqa: E402

PAGE = 16
TOPK_FRACTION = 0.03
SELECTORS = ("gaussian", "certified", "topk", "dense")
PRESETS: dict[str, dict] = {
    "smoke": dict(device="cpu", contexts=[256], layers=4, heads=4, kv_heads=2, head_dim=16, dtype="float32",
                  steps=3, warmup=1, selectors=list(SELECTORS), inductor=False, budget_s=300.0),
    "quick": dict(device="cuda", contexts=[32768, 131072], layers=4, heads=8, kv_heads=8, head_dim=128,
                  dtype="bfloat16", steps=16, warmup=3, selectors=["gaussian", "certified"], inductor=True,
                  budget_s=225.0),
    "full": dict(device="cuda", contexts=[32768, 131072, 524288], layers=4, heads=8, kv_heads=8, head_dim=128,
                 dtype="bfloat16", steps=32, warmup=3, selectors=list(SELECTORS), inductor=True, budget_s=500.0),
}


class SDPAAttention(gpt_fast.Attention):
    """The zoo attention with softmax through ``F.scaled_dot_product_attention`` (no mask, GQA
    native): the softmax twin as a flash-decoding user would write it."""

    def forward(self, x, freqs, input_pos):
        a = self.args
        batch, seqlen, _ = x.shape
        d, hq, hkv = a.head_dim, a.n_head, a.n_kv_head
        q, k, v = (t.transpose(1, 2) for t in self._project(x, freqs))
        k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, scale=a.temperature / math.sqrt(d), enable_gqa=hq != hkv)
        return self.wo(y.transpose(1, 2).reshape(batch, seqlen, hq * d))


def _buffer_len(plan: dict, context: int) -> int:
    return -(-(context + plan["warmup"] + plan["steps"] + 1) // PAGE) * PAGE


def build(plan: dict, context: int, weights: str, fill: list | None = None) -> gpt_fast.Transformer:
    """The model (deterministic weights) with its caches set to a copy of ``fill``."""
    d = plan["head_dim"]
    args = gpt_fast.ModelArgs(vocab_size=512, n_layer=plan["layers"], n_head=plan["heads"],
                              n_kv_head=plan["kv_heads"], dim=plan["heads"] * d,
                              max_seq_len=_buffer_len(plan, context), weights=weights, temperature=1.0)
    model = gpt_fast.build(args, batch=1, dtype=getattr(torch, plan["dtype"]), seed=0, device=plan["device"])
    if weights == "softmax":
        for layer in model.layers:
            layer.attention.__class__ = SDPAAttention
    for layer, (k, v) in zip(model.layers, fill or []):
        layer.attention.kv_cache.k_cache.copy_(k)
        layer.attention.kv_cache.v_cache.copy_(v)
    return model


@torch.no_grad()
def planted_fill(plan: dict, context: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the whole static K/V buffer of planted-span keys aligned with that layer's mean
    query at the first decode step (one eager step, each layer filled just before it attends)."""
    model = build(plan, context, "own_entmax15")
    hq, hkv, d = plan["heads"], plan["kv_heads"], plan["head_dim"]
    handles = []
    for index, layer in enumerate(model.layers):
        def hook(module, args, index=index):
            x, freqs, _ = args
            q = module.wqkv(x)[..., : hq * d].view(x.shape[0], 1, hq, d)
            q = gpt_fast.apply_rotary(q, freqs).transpose(1, 2).float()
            direction = q.reshape(x.shape[0], hkv, hq // hkv, d).mean(2)
            cache = module.kv_cache
            _, k, v = planted(cache.k_cache.shape[0], hq, hkv, cache.k_cache.shape[2], d, cache.k_cache.dtype,
                              cache.k_cache.device, seed + index, direction=direction,
                              scale=module.args.temperature / math.sqrt(d))
            cache.k_cache.copy_(k)
            cache.v_cache.copy_(v)
        handles.append(layer.attention.register_forward_pre_hook(hook))
    token = torch.zeros(1, 1, dtype=torch.long, device=plan["device"])
    model(token, torch.tensor([context], device=plan["device"]))
    for h in handles:
        h.remove()
    fill = [(layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache) for layer in model.layers]
    del model
    return fill


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def position_feed(plan: dict, first: int, count: int) -> Callable[[int], torch.Tensor]:
    """``step -> input_pos`` for ``count`` steps from position ``first``. ``plan["positions"]``:
    ``device`` keeps them on the GPU (``input_pos`` views of one tensor, as gpt-fast's loop
    advances a device tensor), so the host queues step after step; ``host`` builds each from a
    Python int (a pageable copy that waits for the queued work), so every step's host time (guards,
    graph launch) adds to its device time, as in a loop that syncs per token."""
    device = plan["device"]
    if plan.get("positions", "device") == "host":
        return lambda step: torch.tensor([first + step], device=device)
    positions = torch.arange(first, first + count, device=device)
    return lambda step: positions[step:step + 1]


@torch.no_grad()
def decode(step_fn, plan: dict, context: int) -> tuple[float, float, torch.Tensor]:
    """Feed the fixed token from position ``context`` on: ``(s/token timed, s of the warm-up steps
    (compilation, graph recording), logits [steps, vocab] of every step)``."""
    device = plan["device"]
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    position = position_feed(plan, context, plan["warmup"] + plan["steps"])
    logits, start, warm = [], time.perf_counter(), 0.0
    for step in range(plan["warmup"] + plan["steps"]):
        if step == plan["warmup"]:
            _sync(device)
            warm, start = time.perf_counter() - start, time.perf_counter()
        out = step_fn(token, position(step))
        logits.append(out[:, -1].clone())  # CUDA-graph outputs are overwritten by the next replay
    _sync(device)
    return (time.perf_counter() - start) / plan["steps"], warm, torch.cat(logits).float()


def _compiled(plan: dict, method: str, model: torch.nn.Module, context: int):
    mode = "reduce-overhead" if plan["device"] == "cuda" else None
    if method in ("exact", "exact_softmax"):
        return model
    if method in ("inductor", "sdpa_flash"):
        if not plan["inductor"]:
            return torch.compile(model, backend="eager", fullgraph=True)
        return torch.compile(model, mode=mode, fullgraph=True)
    selector = method.removeprefix("entmaxkv_")
    budget = max(PAGE, int(TOPK_FRACTION * context) // PAGE * PAGE)
    options = dict(selector=selector, page_size=PAGE, token_budget=budget)
    if mode:
        options["mode"] = mode
    if not plan["inductor"]:
        options["compiler"] = "eager"
    from entmaxkv_compile.compiler.backend import torch_compile_backend  # not at import: see the module doc

    return torch.compile(model, backend=torch_compile_backend(), options=options, fullgraph=True)


def _run(plan: dict, method: str, context: int, fill: list) -> tuple[float, float, torch.Tensor]:
    weights = "softmax" if method in ("sdpa_flash", "exact_softmax") else "own_entmax15"
    model = build(plan, context, weights, fill)
    step_fn = _compiled(plan, method, model, context)
    try:
        if weights == "softmax" and plan["device"] == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return decode(step_fn, plan, context)
        return decode(step_fn, plan, context)
    finally:
        del step_fn, model
        _release(plan["device"])


def _release(device: str) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, required=True, help="directory for e2e.json")
    parser.add_argument("--contexts", help="comma list of cached tokens, e.g. 32768,131072")
    parser.add_argument("--selectors", help=f"comma list of {','.join(SELECTORS)}")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--budget-s", type=float, help="skip methods not started after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--positions", choices=("device", "host"), default="device",
                        help="input_pos kept on the GPU (gpt-fast's loop) or built from a host int "
                             "each step (a loop that syncs per token; see position_feed)")
    args = parser.parse_args(argv)
    plan = dict(PRESETS[args.preset])
    if args.contexts:
        plan["contexts"] = [int(x) for x in args.contexts.split(",")]
    if args.selectors:
        plan["selectors"] = args.selectors.split(",")
        unknown = set(plan["selectors"]) - set(SELECTORS)
        if unknown:
            raise SystemExit(f"--selectors: unknown {sorted(unknown)}; known: {list(SELECTORS)}")
    plan["positions"] = args.positions
    for name in ("layers", "steps", "budget_s"):
        if getattr(args, name) is not None:
            plan[name] = getattr(args, name)
    return args, plan


def table(meta: dict) -> str:
    """ms/token per method and context, with ratios to plain Inductor and to the SDPA twin."""
    lines = [report.header(meta), "",
             f"{'context':>8s} {'method':20s} {'ms/token':>9s} {'vs inductor':>11s} {'vs sdpa':>8s} "
             f"{'max|dlogit|':>11s} {'warmup s':>8s}  note"]
    by_ctx: dict[int, dict[str, dict]] = {}
    for r in meta["rows"]:
        by_ctx.setdefault(r["context"], {})[r["method"]] = r
    for context, rows in by_ctx.items():
        base = rows.get("inductor", {}).get("ms_per_token")
        sdpa = rows.get("sdpa_flash", {}).get("ms_per_token")
        for method, r in rows.items():
            ms = r.get("ms_per_token")
            ratio = lambda ref: f"{ref / ms:.2f}x" if ms and ref else "-"  # noqa: E731
            err = "-" if r.get("max_logit_err") is None else f"{r['max_logit_err']:.3g}"
            lines.append(f"{context:>8d} {method:20s} {ms if ms else float('nan'):9.3f} {ratio(base):>11s} "
                         f"{ratio(sdpa):>8s} {err:>11s} {r.get('warmup_s') or 0:8.1f}  {r.get('note') or ''}")
    lines.append("(ratios > 1: this method is faster than the baseline)")
    return "\n".join(lines)


def _summary(row: dict) -> str:
    parts = ["-" if row["ms_per_token"] is None else f"{row['ms_per_token']:.3f} ms/token"]
    if row["max_logit_err"] is not None:
        parts.append(f"max|dlogit| {row['max_logit_err']:.3g}")
    if row["note"]:
        parts.append(row["note"])
    return " | ".join(parts)


def _job(plan: dict, seed: int, context: int, method: str, fills: dict, refs: dict, t0: float) -> dict:
    """Run one (context, method); failures and budget skips become the row's note."""
    row = dict(context=context, method=method, ms_per_token=None, max_logit_err=None, warmup_s=None, note=None)
    if method not in ("exact", "exact_softmax") and time.time() - t0 > plan["budget_s"]:
        row["note"] = f"skipped: time budget {plan['budget_s']:.0f}s spent"
        return row
    try:
        if context not in fills:
            fills[context] = planted_fill(plan, context, seed)
        seconds, warm, logits = _run(plan, method, context, fills[context])
    except Exception as exc:  # noqa: BLE001 - a failing method is a note, the run goes on
        row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        _release(plan["device"])
        return row
    if method in ("exact", "exact_softmax"):
        refs[(context, method)] = logits
        row["logit_scale"] = float(logits.abs().max())
    else:
        ref = refs.get((context, "exact_softmax" if method == "sdpa_flash" else "exact"))
        if ref is not None:
            row["max_logit_err"] = float((logits - ref).abs().max())
    row.update(ms_per_token=seconds * 1e3, warmup_s=warm)
    return row


def main(argv: list[str] | None = None) -> int:
    args, plan = _parse(argv)
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        print("this preset needs a CUDA GPU (use --preset smoke)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    meta = report.environment(torch.device(plan["device"]))
    meta.update(preset=args.preset, plan=plan, page_size=PAGE, alpha=1.5, rows=[])
    print(report.header(meta), flush=True)
    fills, refs = {}, {}
    # baselines first (before the backend's import), then each selector at every context in turn
    jobs = [(c, m) for c in plan["contexts"] for m in ("exact", "exact_softmax", "inductor", "sdpa_flash")]
    jobs += [(c, f"entmaxkv_{s}") for s in plan["selectors"] for c in plan["contexts"]]
    for context, method in jobs:
        row = _job(plan, args.seed, context, method, fills, refs, t0)
        print(f"[{time.time() - t0:6.1f}s] context={context} {method}: {_summary(row)}", flush=True)
        meta["rows"].append(row)
        (args.out / "e2e.json").write_text(json.dumps(meta, indent=1))
    meta["elapsed_s"] = time.time() - t0
    (args.out / "e2e.json").write_text(json.dumps(meta, indent=1))
    print(table(meta), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
