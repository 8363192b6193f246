"""The backend's ``context_parallel`` option: the single-GPU zoo model with caches of one rank's
capacity, compiled per rank on 2 and 4 gloo processes, decodes the unsharded model's tokens and
logits (dense, certified, gaussian) across rank boundaries; what the option does not support is
refused with its reason (and the graph raises instead of running attention over one shard);
bad option values name the option."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import distributed_workers as workers
from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.compiler.backend import BackendSettings
from entmaxkv_compile.compiler.explain import recording
from entmaxkv_compile.distributed import (ContextParallelDecoder, context_parallel_capacity, scatter_prompt,
                                          spawn)
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from examples.zoo import gpt_fast, paged

STEPS = 8  # decode positions 6..13: the append crosses rank boundaries (8 for 2 ranks; 8 and 12 for 4)
SELECTORS = ("dense", "certified", "gaussian")


@pytest.mark.parametrize("world", [2, 4])
def test_compiled_shards_decode_the_unsharded_model(world):
    results = spawn(workers.context_parallel_generate, world, args=(STEPS, SELECTORS), timeout_s=240)
    want_tokens, want_logits = gpt_fast.generate(gpt_fast.build(workers.context_parallel_args(), batch=2),
                                                 workers.context_parallel_prompt(), STEPS)
    capacity = workers.CP_TOKENS // world
    for rank, result in enumerate(results):
        assert result["capacity"] == capacity
        for selector in SELECTORS:
            got = result[selector]
            span = f"rank {rank} of {world} holds global positions [{rank * capacity}, {(rank + 1) * capacity})"
            assert [site[:3] for site in got["sites"]] == [
                (f"layers.{i}.attention", "rewritten", "decode") for i in range(2)]
            assert all("cp_append + cp_decode_step" in site[3] and span in site[3] for site in got["sites"])
            # the statistics were caught up from this rank's rows of the prompt and kept in order
            last = min(max(workers.CP_PROMPT + STEPS - rank * capacity, 0), capacity) - 1
            for position, valid in got["states"]:
                assert position.tolist() == [last, last] and valid.all(), (rank, selector)
            assert torch.equal(got["tokens"], want_tokens), (rank, selector)
            torch.testing.assert_close(got["logits"], want_logits, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
@pytest.mark.parametrize("options", [{"compiler": "eager"}, {}], ids=["eager", "inductor"])
def test_two_gpus_over_nccl_decode_the_unsharded_model(options, monkeypatch):
    """The same on two GPUs over NCCL, the decode kernels compiled for the GPU, with the eager
    compiler and with Inductor (without CUDA graphs, which the option refuses)."""
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.setenv(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # workers import Triton afresh
    results = spawn(workers.context_parallel_generate, 2, args=(STEPS, SELECTORS, options), backend="nccl",
                    timeout_s=300)
    want_tokens, want_logits = gpt_fast.generate(gpt_fast.build(workers.context_parallel_args(), batch=2),
                                                 workers.context_parallel_prompt(), STEPS)
    for rank, result in enumerate(results):
        for selector in SELECTORS:
            got = result[selector]
            assert all(site[1] == "rewritten" for site in got["sites"]), (rank, selector, got["sites"])
            assert torch.equal(got["tokens"], want_tokens), (rank, selector)
            torch.testing.assert_close(got["logits"], want_logits, atol=1e-4, rtol=0)


def test_ragged_batch_decodes_the_unsharded_model():
    """Per-row positions (rows at 6.. and 3..) and per-row writes (setitem, scatter_) on 2 ranks:
    row 0 crosses into rank 1 at position 8 while row 1 is still on rank 0."""
    writes = ("setitem", "scatter")
    results = spawn(workers.context_parallel_ragged, 2, args=(STEPS, writes), timeout_s=240)
    for write in writes:
        args = workers.context_parallel_args()
        args.positions, args.kv_write = "per_row", write
        want_tokens, want_logits = gpt_fast.generate_ragged(
            gpt_fast.build(args, batch=2), workers.context_parallel_prompt(),
            gpt_fast.ragged_lengths(2, workers.CP_PROMPT), STEPS)
        for result in results:
            got = result[write]
            assert [site[1] for site in got["sites"]] == ["rewritten", "rewritten"]
            assert all("cp_append + cp_decode_step" in site[3] for site in got["sites"])
            assert torch.equal(got["tokens"], want_tokens), write
            torch.testing.assert_close(got["logits"], want_logits, atol=1e-5, rtol=0)


# --- one rank in this process: the rewrite's forms, refusals and errors -----------------------------


@pytest.fixture
def one_rank(tmp_path):
    """A gloo group of this process alone (context parallel over one rank is the plain decode)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


OPTIONS = {"page_size": 4, "compiler": "eager", "context_parallel": True}
PROMPT = 6


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="entmaxkv", options={**OPTIONS, **options}, dynamic=False)


def _prompt() -> torch.Tensor:
    return torch.randint(1, 96, (2, PROMPT), generator=torch.Generator().manual_seed(3))


def test_index_copy_write_on_one_rank_equals_the_model(one_rank):
    """The option given as a ProcessGroup object; the model's caches hold every position."""
    args = workers.context_parallel_args()
    args.kv_write = "index_copy"
    want = gpt_fast.generate(gpt_fast.build(args), _prompt(), STEPS)
    model = gpt_fast.build(args)
    decode = _compiled(model, selector="certified", context_parallel=one_rank)
    with recording() as report:
        got = gpt_fast.generate(model, _prompt(), STEPS, decode=decode, prefill=model)
    assert [s.status for s in report.sites] == ["rewritten", "rewritten"]
    [graph] = report.graphs  # the model's writes and masks are gone: a global position indexes nothing local
    assert graph.code_after.count("entmaxkv.cp_append.default(") == 2
    assert graph.code_after.count("entmaxkv.cp_decode_step.default(") == 2
    assert "index_copy_" in graph.code_before and "index_copy_" not in graph.code_after
    assert "masked_fill" in graph.code_before and "masked_fill" not in graph.code_after
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def _refused_decode(model, call_args, **options) -> tuple[list, str]:
    """Prefill uncompiled, then one compiled decode call: ``(sites, the error it raised)``."""
    with torch.no_grad():
        model(*call_args(_prompt(), torch.arange(PROMPT)))
    compiled = _compiled(model, **options)
    with recording() as report, torch.no_grad(), pytest.raises(RuntimeError) as error:
        compiled(*call_args(_prompt()[:, -1:], torch.tensor([PROMPT])))
    return report.sites, str(error.value)


def _zoo(**changes):
    args = workers.context_parallel_args()
    for name, value in changes.items():
        setattr(args, name, value)
    return gpt_fast.build(args)


@pytest.mark.parametrize("changes, reason", [
    ({"window": 4}, "a sliding window or a left-padded mask"),
    ({"alibi": "all"}, "ALiBi is not supported"),
    ({"softcap": 30.0}, "a logit soft-cap is not supported"),
    ({"kv_fused": True}, "a fused K/V buffer is not supported"),
    ({"head_alphas": (1.5, 2.0, 1.5, 2.0)}, "the heads' alphas differ"),
])
def test_unsupported_sites_are_refused_and_the_graph_raises(one_rank, changes, reason, caplog):
    sites, error = _refused_decode(_zoo(**changes), lambda idx, pos: (idx, pos))
    assert [s.status for s in sites] == ["refused", "refused"]
    assert all(reason in s.reason for s in sites)
    assert "not rewritten under context_parallel" in error and reason in error
    assert "not rewritten" in caplog.text  # refused sites warn as usual


def test_paged_cache_is_refused(one_rank):
    args = paged.PagedArgs(**vars(workers.context_parallel_args()), page_size=4)
    model = paged.build(args)
    table = paged.shuffled_table(2, args)
    sites, error = _refused_decode(model, lambda idx, pos: (idx, pos, table))
    assert all(s.status == "refused" and "paged KV cache (block table) is not supported" in s.reason for s in sites)
    assert "paged KV cache" in error


class _MaskInput(torch.nn.Module):
    """A static cache whose mask is an argument of the step (checked per call on one GPU)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.randn(1, 2, 16, 8))
        self.register_buffer("v", torch.randn(1, 2, 16, 8))

    def forward(self, q, k_new, v_new, pos, mask):
        from entmaxkv_compile import entmax

        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        scores = (q @ self.k.transpose(-2, -1) * 0.5).masked_fill(~mask, float("-inf"))
        return entmax(scores, alpha=1.5, dim=-1) @ self.v


def test_mask_input_is_refused(one_rank):
    compiled = _compiled(_MaskInput())
    rows = [torch.randn(1, 2, 1, 8) for _ in range(3)]
    with recording() as report, pytest.raises(RuntimeError, match="the attention mask is a graph input"):
        compiled(*rows, torch.tensor([9]), torch.arange(16).view(1, 1, 1, 16) <= 9)
    assert [s.status for s in report.sites] == ["refused"]


def test_prefill_graph_raises(one_rank):
    model = _zoo()
    with recording() as report, torch.no_grad(), pytest.raises(RuntimeError, match="prefill under context_parallel"):
        _compiled(model)(_prompt(), torch.arange(PROMPT))
    assert [s.status for s in report.sites] == ["refused", "refused"]


def test_failed_guard_raises_instead_of_falling_back(one_rank):
    model = _zoo(mask="buffer")
    with torch.no_grad():
        model(_prompt(), torch.arange(PROMPT))
        compiled = _compiled(model, selector="certified")
        compiled(_prompt()[:, -1:], torch.tensor([PROMPT]))
        model.layers[0].attention.causal_mask.logical_not_().logical_not_()  # same values, a new version
        with pytest.raises(RuntimeError, match="run-time guard failed .* under context_parallel: there is no fallback"):
            compiled(_prompt()[:, -1:], torch.tensor([PROMPT + 1]))


def test_int8_sketch_is_refused(one_rank):
    with pytest.raises(ValueError, match="certify_sketch='int8' is supported by Decoder and sparse_decode only"):
        BackendSettings.parse({**OPTIONS, "certify_sketch": "int8"})


def test_bad_option_values_name_the_option(one_rank):
    with pytest.raises(TypeError, match=r"options\['context_parallel'\] must be None, True .* got str 'yes'"):
        BackendSettings.parse({"context_parallel": "yes"})
    with pytest.raises(TypeError, match=r"options\['context_parallel'\] must be .* got int 1"):
        BackendSettings.parse({"context_parallel": 1})
    settings = BackendSettings.parse({"context_parallel": one_rank})
    assert (settings.context_parallel.rank, settings.context_parallel.world_size) == (0, 1)
    assert BackendSettings.parse({"context_parallel": False}).context_parallel is None
    for mode in ("reduce-overhead", "max-autotune"):  # both turn on Inductor's CUDA graphs
        with pytest.raises(ValueError, match=r"options\['context_parallel'\] cannot be combined with Inductor's CUDA"):
            BackendSettings.parse({"context_parallel": one_rank, "mode": mode})
    with pytest.raises(ValueError, match="CUDA graphs"):
        BackendSettings.parse({"context_parallel": one_rank, "triton.cudagraphs": True})
    assert BackendSettings.parse({"context_parallel": one_rank, "mode": "max-autotune-no-cudagraphs"}).mode


def test_option_needs_an_initialised_group():
    with pytest.raises(ValueError, match=r"options\['context_parallel'\] needs torch.distributed initialised"):
        BackendSettings.parse({"context_parallel": True})


# --- the helpers ----------------------------------------------------------------------------------


def test_capacity_and_scatter_prompt_without_a_group():
    assert context_parallel_capacity(37, page_size=4) == 40  # one process: whole pages
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    k_local, v_local = scatter_prompt(k, v, 8)
    assert torch.equal(k_local[:, :, :5], k) and torch.equal(v_local[:, :, :5], v)
    assert not k_local[:, :, 5:].any() and not v_local[:, :, 5:].any()
    with pytest.raises(ValueError, match="k_full holds 9 tokens, more than the 1 ranks' 8"):
        scatter_prompt(torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4), 8)
    with pytest.raises(ValueError, match="v_full must be a tensor of k_full's shape"):
        scatter_prompt(k, v[:, :2], 8)


def test_capacity_rule_matches_the_eager_decoder():
    for total in (37, 16, 1, 100):
        decoder = ContextParallelDecoder(EntmaxKVConfig(page_size=4), batch=1, q_heads=2, kv_heads=1, head_dim=4,
                                         capacity=total, dtype=torch.float32, device="cpu")
        assert decoder.local_capacity == context_parallel_capacity(total, page_size=4) == -(-total // 4) * 4


PAGE_4 = EntmaxKVConfig(page_size=4)


def test_over_buffers_wraps_without_copying_and_checks_them():
    k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    stats = KVPageStats.allocate(1, 2, 8, 4, page_size=4)
    decoder = ContextParallelDecoder.over_buffers(PAGE_4, q_heads=4, k_cache=k, v_cache=v, stats=stats)
    assert decoder.k_cache is k and decoder.v_cache is v and decoder.stats is stats
    assert (decoder.local_capacity, decoder.start, decoder.capacity) == (8, 0, 8)
    decoder.append(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), torch.tensor([3]))
    assert torch.equal(k[:, :, 3], torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match=r"the caches' length \(8\) must be a whole number of pages of page_size 16"):
        ContextParallelDecoder.over_buffers(None, q_heads=4, k_cache=k, v_cache=v,
                                            stats=KVPageStats.allocate(1, 2, 8, 4, page_size=16))
    with pytest.raises(ValueError, match="stats must be the KVPageStats of k_cache with page_size 4, got 16"):
        ContextParallelDecoder.over_buffers(PAGE_4, q_heads=4, k_cache=k, v_cache=v,
                                            stats=KVPageStats.allocate(1, 2, 8, 4, page_size=16))
    with pytest.raises(ValueError, match=r"q_heads \(3\) must be a multiple of the caches' kv_heads \(2\)"):
        ContextParallelDecoder.over_buffers(PAGE_4, q_heads=3, k_cache=k, v_cache=v, stats=stats)
    with pytest.raises(ValueError, match="v_cache must be a tensor like k_cache"):
        ContextParallelDecoder.over_buffers(PAGE_4, q_heads=4, k_cache=k, v_cache=v[:, :1], stats=stats)


def test_prewarm_runs_the_step_on_the_shard_alone_and_writes_nothing():
    from entmaxkv_compile.compiler.passes.context_parallel import ContextParallelCall

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 8, 4, generator=g), torch.randn(2, 2, 8, 4, generator=g)
    stats = KVPageStats.from_cache(k, torch.tensor([8, 5]), page_size=4)
    extra = [*stats.buffers(), *stats.sequence_state()[:2]]
    before = [t.clone() for t in (k, v, *extra)]
    call = ContextParallelCall((2, 4, 1, 4), torch.float32, 0, 1, (0, 1, 2, 3), (4, 5), 0.5,
                               EntmaxKVConfig(page_size=4, selector="certified", alpha=1.5))
    call.prewarm([k, v], extra)  # no process group: it must not communicate
    assert all(torch.equal(a, b) for a, b in zip(before, (k, v, *extra)))
