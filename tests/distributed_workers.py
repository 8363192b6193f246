"""What each spawned rank runs in the distributed tests (module-level, so spawn can import it).

Every rank builds the same global data from a seed, keeps its shard and returns its results; the
tests compare them in the parent with the single-process references.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.compiler.backend import torch_compile_backend
from entmaxkv_compile.distributed import ContextParallelDecoder
from entmaxkv_compile.runtime.step import reference_implementation

CAPACITY = 96
PAGE = 8
SHAPE = dict(batch=3, q_heads=4, kv_heads=2, head_dim=8)
LENGTHS = (90, 37, 5)  # ragged: the last sequence lives on rank 0 alone
CASES = (  # (selector, alpha, extra config)
    ("dense", 1.5, {}),
    ("dense", 2.0, {}),
    ("dense", 1.3, {}),
    ("topk", 1.5, {"token_budget": 16}),
    ("gaussian", 1.5, {}),
    ("gaussian", 2.0, {"report_bound": True}),
    ("certified", 1.5, {}),
    ("certified", 2.0, {"sink_pages": 1, "recent_pages": 1}),
)
APPENDS = 6


def global_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """The global cache, the queries of the steps and the appended rows, in float64."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = (SHAPE[k] for k in ("batch", "q_heads", "kv_heads", "head_dim"))
    k = torch.randn(b, hkv, CAPACITY, d, generator=g, dtype=torch.float64)
    k[:, :, 40:48] += 1.5 * torch.randn(b, hkv, 1, d, generator=g, dtype=torch.float64)  # a planted span
    return dict(k=k, v=torch.randn(b, hkv, CAPACITY, d, generator=g, dtype=torch.float64),
                q=3.0 * torch.randn(APPENDS + 1, b, hq, 1, d, generator=g, dtype=torch.float64),
                k_new=torch.randn(APPENDS, b, hkv, 1, d, generator=g, dtype=torch.float64),
                v_new=torch.randn(APPENDS, b, hkv, 1, d, generator=g, dtype=torch.float64),
                lengths=torch.tensor(LENGTHS))


def context_parallel_cases(rank: int, world: int) -> dict:
    """Run every case once on the loaded cache, then a certified decode loop that appends a token
    per step (lengths crossing rank boundaries). Returns the results by case."""
    data = global_data()
    impl = reference_implementation()
    results = {}
    for selector, alpha, extra in CASES:
        config = EntmaxKVConfig(selector=selector, alpha=alpha, page_size=PAGE, **extra)
        decoder = ContextParallelDecoder(config, **SHAPE, capacity=CAPACITY, dtype=torch.float64, device="cpu",
                                         implementation=impl)
        decoder.load(data["k"], data["v"], data["lengths"])
        result = decoder.run(data["q"][0], data["lengths"])
        results[(selector, alpha)] = dict(result._asdict(), start=decoder.start, calls=decoder.collective_calls())
    config = EntmaxKVConfig(selector="certified", alpha=1.5, page_size=PAGE)
    decoder = ContextParallelDecoder(config, **SHAPE, capacity=CAPACITY, dtype=torch.float64, device="cpu",
                                     implementation=impl)
    lengths = torch.tensor([44, 23, 0])
    decoder.load(data["k"][:, :, :44], data["v"][:, :, :44], lengths)
    steps = []
    for step in range(APPENDS):
        decoder.append(data["k_new"][step], data["v_new"][step], lengths)
        lengths = lengths + 1
        steps.append(decoder.run(data["q"][step + 1], lengths)._asdict())
    results["appends"] = steps
    results["valid"] = decoder.stats.valid.clone()
    results["gap"] = _append_with_a_gap(data, impl)
    return results


def _append_with_a_gap(data: dict, impl) -> dict:
    """Sequence 0 skips a position: the rank owning it loses the order of its statistics."""
    config = EntmaxKVConfig(selector="certified", alpha=1.5, page_size=PAGE)
    decoder = ContextParallelDecoder(config, **SHAPE, capacity=CAPACITY, dtype=torch.float64, device="cpu",
                                     implementation=impl)
    lengths = torch.tensor([44, 23, 60])
    decoder.load(data["k"][:, :, :60], data["v"][:, :, :60], lengths)
    positions = lengths + torch.tensor([1, 0, 0])
    decoder.check(data["q"][1], positions + 1, data["k_new"][0], data["v_new"][0], positions)
    decoder.append(data["k_new"][0], data["v_new"][0], positions)
    result = decoder.run(data["q"][1], positions + 1)
    return dict(result._asdict(), lengths=positions + 1, k=decoder.k_cache.clone(), v=decoder.v_cache.clone(),
                valid=decoder.stats.valid.clone())


KERNEL_CASES = (  # (selector, alpha, kernel_cap, kernel_max_cap): the decode kernels in parts
    ("dense", 1.5, 1024, 65536),
    ("dense", 2.0, 1024, 65536),
    ("dense", 1.3, 1024, 65536),
    ("gaussian", 1.5, 1024, 65536),
    ("certified", 1.5, 1024, 65536),
    ("dense", 1.5, 1, 65536),  # heads overflow the first gather: gathered again with room for all
    ("dense", 1.5, 1, 1),  # and beyond the largest gather: the exact pure-torch fallback
)


def context_parallel_kernel_cases(rank: int, world: int) -> dict:
    """The kernel path of every case in float32 (the Triton kernels; on a CPU under the
    interpreter), with the fallbacks each decoder took; a certified decode loop whose appends
    cross the rank boundary; a dense step with a NaN key on rank 1."""
    from entmaxkv_compile.distributed import TauSettings
    from entmaxkv_compile.runtime import kernels

    data = global_data()
    results = {}
    for selector, alpha, cap, max_cap in KERNEL_CASES:
        config = EntmaxKVConfig(selector=selector, alpha=alpha, page_size=PAGE)
        decoder = ContextParallelDecoder(config, **SHAPE, capacity=CAPACITY, dtype=torch.float32, device="cpu",
                                         implementation=kernels,
                                         tau=TauSettings(kernel_cap=cap, kernel_max_cap=max_cap))
        decoder.load(data["k"].float(), data["v"].float(), data["lengths"])
        result = decoder.run(data["q"][0].float(), data["lengths"])
        results[(selector, alpha, cap, max_cap)] = dict(result._asdict(), fallbacks=decoder.fallbacks,
                                                        kernel_path=decoder.kernel_path,
                                                        calls=decoder.collective_calls()[0])

    def decoder_for(selector: str) -> ContextParallelDecoder:
        return ContextParallelDecoder(EntmaxKVConfig(selector=selector, alpha=1.5, page_size=PAGE), **SHAPE,
                                      capacity=CAPACITY, dtype=torch.float32, device="cpu", implementation=kernels)

    decoder = decoder_for("certified")  # appends crossing the rank boundary (position 48)
    lengths = torch.tensor([44, 23, 0])
    decoder.load(data["k"][:, :, :44].float(), data["v"][:, :, :44].float(), lengths)
    results["appends"] = []
    for step in range(APPENDS):
        decoder.append(data["k_new"][step].float(), data["v_new"][step].float(), lengths)
        lengths = lengths + 1
        results["appends"].append(decoder.run(data["q"][step + 1].float(), lengths)._asdict())
    decoder = decoder_for("dense")  # a NaN key on rank 1 (sequence 0, KV head 0, position 60)
    k = data["k"].float().clone()
    k[0, 0, 60] = float("nan")
    decoder.load(k, data["v"].float(), data["lengths"])
    results["poisoned"] = decoder.run(data["q"][0].float(), data["lengths"])._asdict()
    return results


def tensor_parallel_generate(rank: int, world: int, steps: int, options: dict) -> dict:
    """Shard the zoo's gpt-fast model over the ranks, compile it with the entmaxkv backend and
    decode greedily; returns the tokens, logits and the backend's report of every site."""
    from entmaxkv_compile.compiler.explain import recording
    from examples.zoo import gpt_fast, gpt_fast_tp

    torch._dynamo.reset()
    model = gpt_fast_tp.shard(gpt_fast.build(tensor_parallel_args(), batch=2))
    prompt = tensor_parallel_prompt()
    decode = torch.compile(model, backend="entmaxkv", options=options)
    with recording() as report:
        tokens, logits = gpt_fast.generate(model, prompt, steps, decode=decode)
    sites = [(s.where, s.status, s.phase) for s in report.sites]
    collectives = [graph.code_after.count("_c10d_functional.all_reduce") for graph in report.graphs]
    return dict(tokens=tokens, logits=logits, sites=sites, collectives=collectives,
                cache_heads=model.layers[0].attention.kv_cache.k_cache.shape[1])


def tensor_parallel_args():
    from examples.zoo import gpt_fast

    return gpt_fast.ModelArgs(n_layer=2, n_head=8, n_kv_head=4, dim=64, max_seq_len=64)


def tensor_parallel_prompt() -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def context_parallel_on_gpus(rank: int, world: int, selectors: tuple[str, ...]) -> dict:
    """Each rank on its own GPU (NCCL), fp16, the default implementation (the Triton kernels
    select): the global cache is built on the CPU from a seed, so every rank has the same data."""
    torch.cuda.set_device(rank)
    g = torch.Generator().manual_seed(7)
    batch, hq, hkv, dim, capacity = 2, 8, 2, 64, 4096
    k = torch.randn(batch, hkv, capacity, dim, generator=g).half()
    v = torch.randn(batch, hkv, capacity, dim, generator=g).half()
    q = (2.0 * torch.randn(batch, hq, 1, dim, generator=g)).half()
    lengths = torch.tensor([4000, 1500])
    results = {}
    for selector in selectors:
        decoder = ContextParallelDecoder(EntmaxKVConfig(selector=selector, page_size=16), batch=batch, q_heads=hq,
                                         kv_heads=hkv, head_dim=dim, capacity=capacity, dtype=torch.float16,
                                         device="cuda")
        decoder.load(k.cuda(), v.cuda(), lengths.cuda())
        result = decoder.run(q.cuda(), lengths.cuda())
        results[selector] = {name: value.cpu() for name, value in result._asdict().items()}
        results[selector].update(kernel_path=decoder.kernel_path, fallbacks=decoder.fallbacks)
    return dict(results, q=q, k=k, v=v, lengths=lengths)


CP_TOKENS, CP_PAGE, CP_PROMPT = 16, 4, 6  # the global capacity, the page size, the prompt length


def context_parallel_args(max_seq_len: int = CP_TOKENS):
    from examples.zoo import gpt_fast

    return gpt_fast.ModelArgs(n_layer=2, n_head=4, n_kv_head=2, dim=32, max_seq_len=max_seq_len)


def context_parallel_prompt() -> torch.Tensor:
    return torch.randint(0, 96, (2, CP_PROMPT), generator=torch.Generator().manual_seed(11))


def context_parallel_model(capacity: int, args=None):
    """The unsharded zoo model (RoPE tables for every global position) with caches of this rank's
    ``capacity`` rows: the single-GPU model code, its caches sized for context parallel."""
    from examples.zoo import gpt_fast

    model = gpt_fast.build(context_parallel_args() if args is None else args, batch=2)
    args = model.args
    for layer in model.layers:
        layer.attention.kv_cache = gpt_fast.KVCache(2, args.n_kv_head, capacity, args.head_dim, torch.float32,
                                                    args.kv_write, per_row=args.positions == "per_row")
    return model


def _load_prompt(model, reference, capacity: int) -> None:
    """Copy this rank's range of every layer's prompt K/V from the unsharded ``reference``."""
    from entmaxkv_compile.distributed import scatter_prompt

    for mine, full in zip(model.layers, reference.layers):
        k, v = scatter_prompt(full.attention.kv_cache.k_cache, full.attention.kv_cache.v_cache, capacity)
        mine.attention.kv_cache.k_cache.copy_(k)
        mine.attention.kv_cache.v_cache.copy_(v)


def context_parallel_ragged(rank: int, world: int, steps: int, writes: tuple[str, ...]) -> dict:
    """Per cache write form in ``writes`` (setitem, scatter): a ragged batch (prompts of 6 and 3
    tokens, one position per sequence) through the zoo model with per-row cache writes, compiled
    with ``context_parallel`` (certified); the prompt prefilled by the unsharded model and loaded
    rank by rank. Returns the tokens, logits and sites per write form."""
    from entmaxkv_compile.compiler.explain import recording
    from entmaxkv_compile.distributed import context_parallel_capacity
    from examples.zoo import gpt_fast

    results = {}
    for write in writes:
        torch._dynamo.reset()
        args = context_parallel_args()
        args.positions, args.kv_write = "per_row", write
        capacity = context_parallel_capacity(CP_TOKENS, CP_PAGE)
        reference, model = gpt_fast.build(args, batch=2), context_parallel_model(capacity, args)
        prompt, lengths = context_parallel_prompt(), gpt_fast.ragged_lengths(2, CP_PROMPT)
        with torch.no_grad():
            logits = reference(prompt, torch.arange(CP_PROMPT))[torch.arange(2), lengths - 1]
        _load_prompt(model, reference, capacity)
        options = {"selector": "certified", "page_size": CP_PAGE, "compiler": "eager", "context_parallel": True}
        decode = torch.compile(model, backend="entmaxkv", options=options, dynamic=False)
        tokens, all_logits = [], []
        token = logits.argmax(-1, keepdim=True)
        with recording() as report, torch.no_grad():
            for step in range(steps):
                logits = decode(token, lengths + step)[:, -1]
                all_logits.append(logits)
                token = logits.argmax(-1, keepdim=True)
                tokens.append(token)
        results[write] = dict(tokens=torch.cat(tokens, 1), logits=torch.stack(all_logits, 1),
                              sites=[(s.where, s.status, s.phase, s.reason) for s in report.sites])
    return results



def context_parallel_generate(rank: int, world: int, steps: int, selectors: tuple[str, ...],
                              compile_options: dict | None = None) -> dict:
    """Per selector: the zoo model with this rank's caches, compiled with ``context_parallel``;
    the prompt prefilled by the unsharded model and loaded rank by rank (``scatter_prompt``); then
    greedy decode steps at global positions. Returns the tokens, logits, sites and the order state
    (last local position, valid) of each layer's page statistics per selector. On a NCCL group
    each rank runs on its own GPU, with ``compile_options`` (default: the eager compiler)."""
    from entmaxkv_compile.compiler.explain import recording
    from entmaxkv_compile.compiler.passes.static_state import STATS
    from entmaxkv_compile.distributed import context_parallel_capacity
    from examples.zoo import gpt_fast

    device = "cpu"
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    capacity = context_parallel_capacity(CP_TOKENS, CP_PAGE)
    results = {"capacity": capacity}
    for selector in selectors:
        torch._dynamo.reset()
        reference = gpt_fast.build(context_parallel_args(), batch=2).to(device)  # capacity W*C, plain eager
        model = context_parallel_model(capacity).to(device)

        def prefill(prompt: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
            logits = reference(prompt, input_pos)
            _load_prompt(model, reference, capacity)
            return logits

        options = {"selector": selector, "page_size": CP_PAGE, "context_parallel": True,
                   **(compile_options or {"compiler": "eager"})}
        decode = torch.compile(model, backend=torch_compile_backend(), options=options, dynamic=False)
        with recording() as report:
            tokens, logits = gpt_fast.generate(model, context_parallel_prompt().to(device), steps, decode=decode,
                                               prefill=prefill)
        tokens, logits = tokens.cpu(), logits.cpu()
        states = [STATS.lookup(layer.attention.kv_cache.k_cache, CP_PAGE).sequence_state()[:2] for layer in model.layers]
        results[selector] = dict(tokens=tokens, logits=logits, states=[(p.cpu().clone(), v.cpu().clone()) for p, v in states],
                                 sites=[(s.where, s.status, s.phase, s.reason) for s in report.sites])
    return results
