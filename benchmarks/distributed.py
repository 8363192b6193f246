"""Decode beyond one GPU: context parallel weak scaling and tensor parallel end to end.

    torchrun --nproc_per_node 2 benchmarks/distributed.py --out OUT     # 2 GPUs, NCCL
    python benchmarks/distributed.py --smoke --out OUT                  # CPU: spawns 2 gloo ranks

(on the lent machine keep NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 set.) Two parts, every rank taking part, rank 0 reporting:

- **context parallel** (``ContextParallelDecoder``), per selector (dense, gaussian): one decode
  step over ``W x N`` tokens sharded over the ``W`` ranks (``N`` = 1M per GPU: 2M over 2), against
  the same code on one rank at ``N`` (every rank runs its own one-rank group at once), and the
  same sharded step with its collectives replaced by no-ops (its compute alone: the difference is
  what the collectives cost). GQA 32/8, D 128, fp16, planted-span keys. On a GPU the project's
  single-GPU ``Decoder`` (Triton kernels) at ``N`` is timed too: on a GPU the context parallel
  step runs the same kernels in parts (``distributed/local_kernels.py``), so both ratios matter:
  against the same code on one rank (what sharding costs) and against the single-GPU step (what
  a user gives up to hold twice the cache). Times are the slowest rank's
  median of eager steps (barrier before each); ``--cuda-graphs`` captures the step instead.
- **tensor parallel** end to end: the zoo's gpt-fast model (4 layers, GQA 32/8, D 128), caches
  filled with planted spans at a 128k context, compiled with ``backend="entmaxkv"`` (certified)
  on one GPU and sharded over the ``W`` ranks (``examples/zoo/gpt_fast_tp.py``); greedy decode,
  ms/token, and whether the tokens are identical.

Writes ``OUT/distributed.json``; the last lines printed are the table.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import e2e, report  # noqa: E402
from benchmarks.dense_decode import kernel_breakdown  # noqa: E402
from benchmarks.data_families import planted  # noqa: E402
from entmaxkv_compile import Decoder, EntmaxKVConfig  # noqa: E402
from entmaxkv_compile.compiler.backend import torch_compile_backend  # noqa: E402
from entmaxkv_compile.distributed import Collectives, ContextParallelDecoder, spawn  # noqa: E402
from examples.zoo import gpt_fast_tp  # noqa: E402

PAGE = 16
PRESETS: dict[str, dict] = {
    "smoke": dict(per_rank=256, hq=4, hkv=2, dim=16, dtype="float32", selectors=["dense", "gaussian"], reps=2,
                  tp=dict(device="cpu", contexts=[64], layers=2, heads=4, kv_heads=2, head_dim=16, dtype="float32",
                          steps=4, warmup=1, inductor=False)),
    "full": dict(per_rank=1 << 20, hq=32, hkv=8, dim=128, dtype="float16", selectors=["dense", "gaussian"], reps=10,
                 tp=dict(device="cuda", contexts=[131072], layers=4, heads=32, kv_heads=8, head_dim=128,
                         dtype="float16", steps=64, warmup=3, inductor=True)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks (every rank must call it)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _time_ms(fn, device: torch.device, reps: int, cuda_graphs: bool) -> float:
    """The slowest rank's median ms of ``fn`` (2 warm-up calls; a barrier before each call)."""
    for _ in range(2):
        fn()
    if cuda_graphs and device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    times = []
    for _ in range(reps):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return _slowest(statistics.median(times), device)


def _cp_decoder(plan: dict, selector: str, capacity: int, group, device: torch.device) -> ContextParallelDecoder:
    config = EntmaxKVConfig(selector=selector, page_size=PAGE)
    return ContextParallelDecoder(config, group=group, batch=1, q_heads=plan["hq"], kv_heads=plan["hkv"],
                                  head_dim=plan["dim"], capacity=capacity, dtype=getattr(torch, plan["dtype"]),
                                  device=device)


def _fill(decoder: ContextParallelDecoder, q: torch.Tensor, seed: int, length: int) -> torch.Tensor:
    """Planted-span keys aligned with ``q``'s groups in this rank's shard; returns the global lengths."""
    batch, hkv, n, dim = decoder.k_cache.shape
    direction = q.float().reshape(batch, hkv, -1, dim).mean(2)
    _, k, v = planted(batch, q.shape[1], hkv, n, dim, decoder.dtype, decoder.device, seed, direction=direction)
    decoder.k_cache.copy_(k)
    decoder.v_cache.copy_(v)
    lengths = torch.tensor([length], device=decoder.device)
    decoder.prefill(lengths)
    return lengths


def _sharded(plan: dict, selector: str, q: torch.Tensor, device: torch.device, cuda_graphs: bool) -> dict:
    """The step over ``W x N`` tokens sharded over the ranks, with and without its collectives, and
    (GPU, ``plan["profile"]``) the device time of each kernel of one eager step, per name."""
    world, rank, n = dist.get_world_size(), dist.get_rank(), plan["per_rank"]
    decoder = _cp_decoder(plan, selector, world * n, None, device)
    lengths = _fill(decoder, q, seed=1 + rank, length=world * n)
    calls0, bytes0 = decoder.collective_calls()
    result = decoder.run(q, lengths)
    calls1, bytes1 = decoder.collective_calls()
    ms_cp = _time_ms(lambda: decoder.run(q, lengths), device, plan["reps"], cuda_graphs)
    comm, decoder.comm = decoder.comm, Collectives.local()
    ms_compute = _time_ms(lambda: decoder.run(q, lengths), device, plan["reps"], cuda_graphs)
    decoder.comm = comm
    kernels_us = kernel_breakdown(lambda: decoder.run(q, lengths)) if plan.get("profile") else None
    return dict(ms_cp=ms_cp, ms_compute=ms_compute, kernels_us=kernels_us, collective_share=max(0.0, 1 - ms_compute / ms_cp),
                collective_calls=calls1 - calls0, collective_bytes=bytes1 - bytes0,
                fallbacks=decoder.fallbacks, kernel_path=decoder.kernel_path,
                selected=float(result.num_selected.sum()) / (plan["hkv"] * decoder.stats.num_pages),
                certified=float(result.certified.float().mean()))


def _one_rank(plan: dict, selector: str, q: torch.Tensor, group, device: torch.device, cuda_graphs: bool) -> dict:
    """The same code over ``N`` tokens on this rank alone, and (GPU) the single-GPU kernel Decoder."""
    decoder = _cp_decoder(plan, selector, plan["per_rank"], group, device)
    lengths = _fill(decoder, q, seed=1 + dist.get_rank(), length=plan["per_rank"])
    ms_one = _time_ms(lambda: decoder.run(q, lengths), device, plan["reps"], cuda_graphs)
    ms_kernels = None
    if device.type == "cuda":
        k, v = decoder.k_cache, decoder.v_cache
        kernels = Decoder.for_cache(k, plan["hq"], EntmaxKVConfig(selector=selector, page_size=PAGE))
        kernels.prefill(k, lengths)
        ms_kernels = _time_ms(lambda: kernels.run(q, k, v, lengths), device, plan["reps"], False)
    return dict(ms_one_rank=ms_one, ms_kernels_one_gpu=ms_kernels)


def _say(message: str) -> None:
    """Progress on rank 0, flushed at once (a long run shows where it is, even if it is cut)."""
    if dist.get_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def context_parallel(plan: dict, device: torch.device, cuda_graphs: bool) -> list[dict]:
    world, n = dist.get_world_size(), plan["per_rank"]
    dtype = getattr(torch, plan["dtype"])
    q = planted(1, plan["hq"], plan["hkv"], PAGE, plan["dim"], dtype, device, seed=0)[0]
    dist.broadcast(q, src=0)  # the same query on every rank, whatever each device's generator does
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    kv_bytes = 2 * plan["hkv"] * n * plan["dim"] * torch.tensor([], dtype=dtype).element_size()
    rows = []
    for selector in plan["selectors"]:
        row = dict(selector=selector, world=world, n_global=world * n, n_per_rank=n, kv_bytes_per_rank=kv_bytes)
        _say(f"context parallel, {selector}: {world} x {n} tokens sharded")
        row.update(_sharded(plan, selector, q, device, cuda_graphs))
        _say(f"context parallel, {selector}: {row['ms_cp']:.3f} ms sharded; now {n} tokens on one rank")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row.update(_one_rank(plan, selector, q, singles[dist.get_rank()], device, cuda_graphs))
        row.update(weak_scaling=row["ms_cp"] / row["ms_one_rank"], gbps_per_rank=kv_bytes / row["ms_cp"] / 1e6)
        _say(f"context parallel, {selector}: {row['ms_one_rank']:.3f} ms on one rank, "
             f"weak scaling {row['weak_scaling']:.2f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


@torch.no_grad()
def _greedy(step_fn, plan: dict, context: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``(ms/token, tokens, logits)`` of greedy decoding from position ``context`` (warm-up
    steps first, untimed: compilation and graph recording)."""
    device = torch.device(plan["device"])
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    tokens, logits = [], []
    for step in range(plan["warmup"] + plan["steps"]):
        if step == plan["warmup"]:
            _sync(device)
            start = time.perf_counter()
        last = step_fn(token, torch.tensor([context + step], device=device))[:, -1].clone()
        token = last.argmax(-1, keepdim=True)
        tokens.append(token)
        logits.append(last)
    _sync(device)
    ms = (time.perf_counter() - start) * 1e3 / plan["steps"]
    return ms, torch.cat(tokens, 1).cpu(), torch.cat(logits).float().cpu()


def _compile(model: torch.nn.Module, plan: dict, mode: str | None):
    """``model`` compiled with the entmaxkv backend, certified (Inductor in ``mode``, or the
    rewritten graph run eagerly when the plan has no Inductor)."""
    options = dict(selector="certified", page_size=PAGE)
    if mode is not None:
        options["mode"] = mode
    if not plan["inductor"]:
        options["compiler"] = "eager"
    return torch.compile(model, backend=torch_compile_backend(), options=options, fullgraph=True)


def tensor_parallel(plan: dict, tp_mode: str | None) -> list[dict]:
    world = dist.get_world_size()
    rows = []
    for context in plan["contexts"]:
        fill = e2e.planted_fill(plan, context, seed=0)
        for k, v in fill:  # every rank starts from rank 0's caches
            dist.broadcast(k, src=0)
            dist.broadcast(v, src=0)
        results = {}
        for name in ("one_gpu", "tensor_parallel"):
            _say(f"tensor parallel, context {context}: {name} (compiling, then {plan['steps']} tokens)")
            torch._dynamo.reset()
            model = e2e.build(plan, context, "own_entmax15", fill)
            if name == "tensor_parallel":
                gpt_fast_tp.shard(model)
            step = _compile(model, plan, tp_mode)
            dist.barrier()
            ms, tokens, logits = _greedy(step, plan, context)
            results[name] = (_slowest(ms, torch.device(plan["device"])), tokens, logits)
            del step, model
        (ms_one, tok_one, log_one), (ms_tp, tok_tp, log_tp) = results["one_gpu"], results["tensor_parallel"]
        rows.append(dict(context=context, world=world, layers=plan["layers"], hq=plan["heads"], hkv=plan["kv_heads"],
                         ms_one_gpu=ms_one, ms_tensor_parallel=ms_tp, speedup=ms_one / ms_tp,
                         steps=plan["steps"], tokens_identical=bool(torch.equal(tok_one, tok_tp)),
                         max_logit_diff=float((log_one - log_tp).abs().max())))
        del fill
    return rows


def run(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    """Both parts on this rank; rank 0 returns the results."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    plan = PRESETS["smoke" if args.smoke else "full"]
    if args.per_rank:
        plan = dict(plan, per_rank=args.per_rank)
    plan = dict(plan, profile=args.profile and device.type == "cuda")
    meta = dict(report.environment(device), world=world, preset="smoke" if args.smoke else "full",
                page_size=PAGE, cp_plan={k: v for k, v in plan.items() if k != "tp"}, tp_plan=plan["tp"])
    meta["context_parallel"], meta["tensor_parallel"] = [], []
    if "cp" in args.parts:
        with torch.no_grad():
            meta["context_parallel"] = context_parallel(plan, device, args.cuda_graphs)
    tp_mode = None if args.smoke or args.tp_mode == "none" else args.tp_mode
    if "tp" in args.parts:
        meta["tensor_parallel"] = tensor_parallel(plan["tp"], tp_mode)
    return meta if rank == 0 else None


def table(meta: dict) -> str:
    lines = [f"{meta['device']} x{meta['world']} | torch {meta['torch']} | {meta['date']} | preset {meta['preset']}",
             "context parallel (ms per step, slowest rank)",
             f"{'selector':<10}{'tokens':>10}{'W ranks':>10}{'1 rank':>10}{'ratio':>8}{'coll%':>8}"
             f"{'kernels 1GPU':>14}{'calls':>7}{'KiB':>8}{'cert':>6}"]
    for r in meta["context_parallel"]:
        kern = "-" if r["ms_kernels_one_gpu"] is None else f"{r['ms_kernels_one_gpu']:.3f}"
        lines.append(f"{r['selector']:<10}{r['n_global']:>10}{r['ms_cp']:>10.3f}{r['ms_one_rank']:>10.3f}"
                     f"{r['weak_scaling']:>8.2f}{100 * r['collective_share']:>7.1f}%{kern:>14}"
                     f"{r['collective_calls']:>7}{r['collective_bytes'] / 1024:>8.1f}{r['certified']:>6.2f}")
    lines += ["tensor parallel end to end (ms/token, greedy, certified)",
              f"{'context':>8}{'1 GPU':>10}{'W GPUs':>10}{'speedup':>9}  tokens identical  max logit diff"]
    for r in meta["tensor_parallel"]:
        lines.append(f"{r['context']:>8}{r['ms_one_gpu']:>10.3f}{r['ms_tensor_parallel']:>10.3f}{r['speedup']:>9.2f}"
                     f"  {str(r['tokens_identical']):<16}  {r['max_logit_diff']:.2e}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for distributed.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: spawns 2 gloo ranks itself")
    parser.add_argument("--per-rank", type=int, default=None, help="context parallel tokens per rank")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture the context parallel step")
    parser.add_argument("--tp-mode", default="reduce-overhead", help="Inductor mode of the TP run, or 'none'")
    parser.add_argument("--profile", action="store_true", help="per-kernel device times of one sharded step")
    parser.add_argument("--hang-dump-s", type=float, default=None,
                        help="print every thread's stack and exit if the run is still going after this many s")
    parser.add_argument("--parts", nargs="+", choices=("cp", "tp"), default=["cp", "tp"],
                        help="which parts to run (default both)")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    return args


def _spawned(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    return run(rank, world, args)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.hang_dump_s:  # a stuck collective or compile shows where it is instead of a silent timeout
        faulthandler.dump_traceback_later(args.hang_dump_s, exit=True)
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        try:
            meta = run(dist.get_rank(), dist.get_world_size(), args)
        except BaseException:
            # Say why now and leave: the other ranks wait in a collective, so tearing the group
            # down here would block this rank too and hide the error.
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        dist.destroy_process_group()
    elif args.smoke:
        meta = spawn(_spawned, 2, args=(args,), timeout_s=300)[0]
    else:
        raise SystemExit("launch the GPU run with torchrun (see the module doc), or pass --smoke")
    if meta is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "distributed.json").write_text(json.dumps(meta, indent=1))
        print(table(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
