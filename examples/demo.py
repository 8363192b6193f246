"""The main job (`make demo`): compile a small entmax model with our backend and decode.

1. builds a gpt-fast-style decoder with entmax15 attention and a static KV cache holding a
   synthetic long context (keys clustered around a few directions, as trained keys are);
2. prints what the ``"entmaxkv"`` backend found and rewrote (``entmaxkv_compile.explain``);
3. decodes greedily with the uncompiled model (exact full entmax attention), with plain Inductor,
   and with ``torch.compile(backend="entmaxkv")`` under each selector, and prints time per token,
   the largest logit error against the exact model and whether the tokens agree;
4. runs one attention decode step at a longer context through ``sparse_decode`` and prints the
   share of the KV cache each selector reads, its certificate and its error.

Runs on CPU in a few minutes; pass ``--device cuda`` on a GPU (the Triton kernels and CUDA graphs
are used there, and the time per token becomes the point).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import entmaxkv_compile  # noqa: E402
from entmaxkv_compile import EntmaxKVConfig, sparse_decode  # noqa: E402
from entmaxkv_compile.metrics import full_entmax_decode, relative_error  # noqa: E402
from examples.zoo import gpt_fast  # noqa: E402

SELECTORS = ("dense", "certified", "gaussian", "topk")  # dense: the default


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--context", type=int, default=2048, help="tokens already in the model's cache")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per variant")
    parser.add_argument("--token-budget", type=int, default=512, help="the top-k selector's budget")
    parser.add_argument("--probe-context", type=int, default=32768, help="context of the single-step probe")
    return parser.parse_args()


def build_model(opts: argparse.Namespace, dtype: torch.dtype) -> gpt_fast.Transformer:
    """A random-weight 2-layer GQA decoder whose cache holds ``opts.context`` clustered keys."""
    args = gpt_fast.ModelArgs(vocab_size=256, n_layer=2, n_head=8, n_kv_head=2, dim=512,
                              max_seq_len=opts.context + opts.steps + 16, weights="own_entmax15",
                              temperature=1.0)
    model = gpt_fast.build(args, batch=1, dtype=dtype, seed=0, device=opts.device)
    gen = torch.Generator().manual_seed(1)
    for layer in model.layers:
        cache = layer.attention.kv_cache
        shape = (1, args.n_kv_head, opts.context, args.head_dim)
        centers = torch.randn(1, args.n_kv_head, 8, args.head_dim, generator=gen) * 2.0
        which = torch.randint(0, 8, shape[:3], generator=gen)
        keys = centers.expand(1, -1, -1, -1).gather(2, which[..., None].expand(shape)) + torch.randn(shape, generator=gen)
        cache.k_cache[:, :, : opts.context] = keys.to(dtype=dtype, device=opts.device)
        cache.v_cache[:, :, : opts.context] = torch.randn(shape, generator=gen).to(dtype=dtype, device=opts.device)
    return model


def decode(step_fn, opts: argparse.Namespace) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Greedy decode from position ``context``: (seconds per token after the first, logits, tokens)."""
    token = torch.zeros(1, 1, dtype=torch.long, device=opts.device)
    logits_seen, tokens, start = [], [], None
    # input_pos stays on the device (see examples/gpt_fast_decode.py)
    positions = torch.arange(opts.context, opts.context + opts.steps, device=opts.device)
    with torch.no_grad():
        for step in range(opts.steps):
            if step == 1:  # the first step compiles
                _sync(opts.device)
                start = time.perf_counter()
            pos = positions[step:step + 1]
            logits = step_fn(token, pos)[:, -1].clone()
            token = logits.argmax(-1, keepdim=True)
            logits_seen.append(logits.float())
            tokens.append(token)
    _sync(opts.device)
    return (time.perf_counter() - start) / max(opts.steps - 1, 1), torch.stack(logits_seen, 1), torch.cat(tokens, 1)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compile_and_decode(opts: argparse.Namespace, dtype: torch.dtype, exact: torch.Tensor, exact_tokens, **compile_kw):
    torch._dynamo.reset()
    model = torch.compile(build_model(opts, dtype), fullgraph=True, **compile_kw)
    seconds, logits, tokens = decode(model, opts)
    return seconds, (logits - exact).abs().max().item(), bool(torch.equal(tokens, exact_tokens))


def probe_step(opts: argparse.Namespace) -> None:
    """One attention step at a longer context: how much of the cache each selector reads.

    The keys come in contiguous segments of 256 tokens, each around its own direction (documents,
    code blocks); the query points at two of the segments, so the entmax support is concentrated
    in a few pages, as in trained models with long contexts.
    """
    gen = torch.Generator().manual_seed(2)
    batch, q_heads, kv_heads, n, d, seg = 1, 8, 2, opts.probe_context, 64, 256
    centers = torch.randn(kv_heads, n // seg, d, generator=gen)
    k = centers.repeat_interleave(seg, dim=1)[None] * 1.5 + torch.randn(batch, kv_heads, n, d, generator=gen)
    v = torch.randn(batch, kv_heads, n, d, generator=gen)
    target = centers[:, [3, n // seg // 2]].sum(1)  # [Hkv, D]
    q = target.repeat_interleave(q_heads // kv_heads, 0).reshape(1, q_heads, 1, d)
    q = q + 0.3 * torch.randn(q.shape, generator=gen)
    q, k, v = q.to(opts.device), k.to(opts.device), v.to(opts.device)
    seqlens = torch.tensor([n], device=opts.device)
    exact, _ = full_entmax_decode(q, k, v, seqlens, 1.5, d ** -0.5)
    stats = entmaxkv_compile.KVPageStats.from_cache(k, seqlens, 16)
    print(f"\nOne attention step at {n} tokens (GQA 8/2, D=64, alpha=1.5, segmented keys):")
    print(f"  {'selector':16s} {'pages read':>10s} {'certified':>10s} {'delta bound':>12s} {'rel. error':>11s}")
    rows = [(selector, "off") for selector in SELECTORS]
    rows += [(selector, "int8") for selector in SELECTORS if selector != "dense"]
    for selector, sketch in rows:
        # report_bound: also certify the approximate selectors (a min/max read of every page, and
        # with the int8 key sketch a token-level bound); the sketch also drives certified's pages
        cfg = EntmaxKVConfig(selector=selector, token_budget=1024, report_bound=True, certify_sketch=sketch)
        res = sparse_decode(q, k, v, seqlens, cfg, stats)
        share = res.num_selected.float().mean().item() / stats.num_pages
        name = selector if sketch == "off" else f"{selector}+sketch"
        print(f"  {name:16s} {share:10.1%} {res.certified.float().mean().item():10.0%} "
              f"{res.delta_bound.max().item():12.2e} {relative_error(res.out.float(), exact.float()):11.2e}")


def main() -> None:
    opts = parse_args()
    dtype = torch.float32 if opts.device == "cpu" else torch.bfloat16
    mode = "reduce-overhead" if opts.device == "cuda" else None
    print(f"entmaxkv_compile {entmaxkv_compile.__version__} | torch {torch.__version__} | device {opts.device}")
    print(f"model: gpt-fast-style, 2 layers, 8 query / 2 KV heads, head_dim 64, entmax15, "
          f"static cache with {opts.context} tokens of context\n")

    token, pos = torch.zeros(1, 1, dtype=torch.long, device=opts.device), torch.tensor([opts.context], device=opts.device)
    print("What the entmaxkv backend does to each attention site (entmaxkv_compile.explain):")
    print(entmaxkv_compile.explain(build_model(opts, dtype), token, pos))

    t_exact, exact, exact_tokens = decode(build_model(opts, dtype), opts)
    rows = [("eager, exact full entmax", t_exact, 0.0, True)]
    rows.append(("inductor, dense entmax",) + compile_and_decode(opts, dtype, exact, exact_tokens, mode=mode))
    for selector in SELECTORS:
        options = {"selector": selector, "token_budget": opts.token_budget, "min_context": 0}
        if mode:
            options["mode"] = mode
        rows.append((f"entmaxkv, {selector}",)
                    + compile_and_decode(opts, dtype, exact, exact_tokens, backend="entmaxkv", options=options))
    print(f"\nGreedy decoding, {opts.steps} steps from position {opts.context}:")
    print(f"  {'variant':28s} {'ms/token':>9s} {'max |logit err|':>16s} {'same tokens':>12s}")
    for name, seconds, err, same in rows:
        print(f"  {name:28s} {seconds * 1e3:9.2f} {err:16.2e} {str(same):>12s}")
    if opts.device == "cpu":
        print("  (on CPU the rewritten step runs the pure-torch reference, which scores every key;\n"
              "   the speed comes from the Triton kernels on a GPU: see benchmarks/RESULTS.md)")
    probe_step(opts)


if __name__ == "__main__":
    main()
