"""Decode a gpt-fast-style entmax model with ``torch.compile(backend="entmaxkv")``.

Runs the same model twice, side by side: compiled with the default Inductor backend (dense
entmax attention over the whole static cache), then with the ``"entmaxkv"`` backend (the decode
step rewritten into page statistics + page selection + sparse entmax decode). The cache is first
filled with ``--context`` tokens of synthetic keys/values (a prefill of that length would need
the full score matrix); the backend fills the page statistics from it when it first sees the
cache. Prints the time per token of both and the largest logit difference.

    python examples/gpt_fast_decode.py                                   # CPU, small
    python examples/gpt_fast_decode.py --device cuda --context 32768     # GPU, CUDA graphs

This is the minimal walk-through. The benchmark (>= 4 layers, every selector, planted-span caches,
plain Inductor and the SDPA-flash softmax twin side by side, JSON) is ``benchmarks/e2e.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.zoo import gpt_fast  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    parser.add_argument("--steps", type=int, default=16, help="decode steps to time")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--selector", default="certified", choices=("gaussian", "topk", "certified", "dense"))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--mode", default=None, help='Inductor mode (default: "reduce-overhead" on cuda)')
    parser.add_argument("--skip-baseline", action="store_true", help="time only the entmaxkv backend")
    return parser.parse_args()


def build(opts: argparse.Namespace, dtype: torch.dtype) -> gpt_fast.Transformer:
    max_len = -(-(opts.context + opts.warmup + opts.steps + 1) // 16) * 16
    args = gpt_fast.ModelArgs(vocab_size=512, n_layer=opts.layers, n_head=opts.heads, n_kv_head=opts.kv_heads,
                              dim=opts.heads * opts.head_dim, max_seq_len=max_len, weights="own_entmax15",
                              temperature=1.0)
    model = gpt_fast.build(args, batch=opts.batch, dtype=dtype, seed=0, device=opts.device)
    generator = torch.Generator(device="cpu").manual_seed(1)
    for layer in model.layers:  # a synthetic prefilled context: keys with a few strong directions
        cache = layer.attention.kv_cache
        shape = (opts.batch, opts.kv_heads, opts.context, opts.head_dim)
        directions = torch.randn(1, opts.kv_heads, 1, opts.head_dim, generator=generator)
        keys = torch.randn(shape, generator=generator) + 3.0 * directions
        values = torch.randn(shape, generator=generator)
        cache.k_cache[:, :, : opts.context] = keys.to(dtype=dtype, device=opts.device)
        cache.v_cache[:, :, : opts.context] = values.to(dtype=dtype, device=opts.device)
    return model


def decode(step_fn, opts: argparse.Namespace) -> tuple[float, torch.Tensor]:
    """Greedy decode from position ``context``: ``(seconds per timed token, logits [B, steps, V])``."""
    token = torch.zeros(opts.batch, 1, dtype=torch.long, device=opts.device)
    logits_seen = []
    start = None
    # input_pos stays on the device, as gpt-fast's loop keeps it: a position built from a Python
    # int each step is a host-to-device copy that waits for the queued step (host time then adds
    # to every token's time)
    positions = torch.arange(opts.context, opts.context + opts.warmup + opts.steps, device=opts.device)
    with torch.no_grad():
        for step in range(opts.warmup + opts.steps):
            if step == opts.warmup:
                _sync(opts.device)
                start = time.perf_counter()
            pos = positions[step:step + 1]
            logits = step_fn(token, pos)[:, -1].clone()  # CUDA-graph outputs are overwritten by the next replay
            token = logits.argmax(-1, keepdim=True)
            if step >= opts.warmup:
                logits_seen.append(logits)
    _sync(opts.device)
    return (time.perf_counter() - start) / opts.steps, torch.stack(logits_seen, 1).float()



def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    opts = parse_args()
    dtype = getattr(torch, opts.dtype or ("bfloat16" if opts.device == "cuda" else "float32"))
    mode = opts.mode or ("reduce-overhead" if opts.device == "cuda" else None)
    print(f"device={opts.device} context={opts.context} batch={opts.batch} layers={opts.layers} "
          f"heads={opts.heads}/{opts.kv_heads} head_dim={opts.head_dim} dtype={dtype} mode={mode} "
          f"selector={opts.selector}")
    results = {}
    if not opts.skip_baseline:  # before the entmaxkv backend is imported: plain Inductor, entmax inlined
        model = build(opts, dtype)
        compiled = torch.compile(model, mode=mode, fullgraph=True)
        results["inductor (dense entmax)"] = decode(compiled, opts)
        del model, compiled
        torch._dynamo.reset()
    model = build(opts, dtype)
    options = {"selector": opts.selector, "page_size": opts.page_size, "token_budget": opts.token_budget}
    if mode is not None:
        options["mode"] = mode
    from entmaxkv_compile.compiler.backend import torch_compile_backend

    compiled = torch.compile(model, backend=torch_compile_backend(), options=options, fullgraph=True)
    results[f"entmaxkv ({opts.selector})"] = decode(compiled, opts)
    for name, (seconds, _) in results.items():
        print(f"{name:28s} {seconds * 1e3:9.3f} ms/token")
    if len(results) == 2:
        (_, base), (_, ours) = results.values()
        print(f"max |logit difference| entmaxkv vs inductor: {(base - ours).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
