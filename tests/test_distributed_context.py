"""Context parallel decode on 2 and 4 gloo processes against the single-process references:
full exact entmax in float64 and ``run_step`` on the unsharded cache."""

from __future__ import annotations

import math

import pytest
import torch

import distributed_workers as workers
from entmaxkv_compile import EntmaxKVConfig, KVPageStats
from entmaxkv_compile.distributed import Collectives, ContextParallelDecoder, TauSettings, global_threshold, spawn
from entmaxkv_compile.math.reference import entmax_probs_and_threshold, entmax_threshold
from entmaxkv_compile.runtime.step import reference_implementation, run_step

TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ranks(request):
    """``(world, results of every rank)`` of :func:`workers.context_parallel_cases`."""
    return request.param, spawn(workers.context_parallel_cases, request.param, timeout_s=150)


def exact_entmax(q, k, v, lengths, alpha, tokens=None):
    """Full (or ``tokens``-restricted) exact entmax attention, float64: ``out [B, Hq, 1, D]``."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    scores = qg @ k.transpose(-1, -2) / math.sqrt(head_dim)
    mask = (torch.arange(k.shape[2])[None, :] < lengths[:, None])[:, None, None, :]
    if tokens is not None:
        mask = mask & tokens[:, :, None, :]
    p, _ = entmax_probs_and_threshold(scores, alpha, mask=mask.expand_as(scores))
    return (p @ v).reshape(batch, q_heads, 1, head_dim)


def global_tokens(results, world):
    """bool ``[B, Hkv, N]``: the tokens the ranks selected, in global positions."""
    masks = []
    for rank in range(world):
        r = results[rank]
        local = r["page_indices"].shape[-1]
        slots = torch.arange(local)
        pages = torch.zeros(*r["page_indices"].shape[:2], local + 1, dtype=torch.bool)
        ids = torch.where(slots < r["num_selected"][..., None], r["page_indices"].long(), local)
        pages.scatter_(-1, ids, True)
        masks.append(pages[..., :local].repeat_interleave(workers.PAGE, -1))
    return torch.cat(masks, -1)[..., :workers.CAPACITY]


def unsharded_step(config, q, k, v, lengths):
    stats = KVPageStats.from_cache(k, lengths, workers.PAGE)
    return run_step(reference_implementation(), q, k, v, lengths, stats.buffers(), config, alpha=config.alpha,
                    scale=1 / math.sqrt(k.shape[-1]), stats_valid=stats.valid_for(lengths))


def test_every_rank_returns_the_same_global_result(ranks):
    world, results = ranks
    for key in [case[:2] for case in workers.CASES]:
        for rank in range(1, world):
            for field in ("out", "tau", "certified", "delta_bound"):
                assert torch.equal(results[rank][key][field], results[0][key][field]), (key, field, rank)


@pytest.mark.parametrize("selector,alpha", [(s, a) for s, a, _ in workers.CASES if s in ("dense", "certified")])
def test_dense_and_certified_equal_full_entmax_and_the_unsharded_step(ranks, selector, alpha):
    world, results = ranks
    data = workers.global_data()
    extra = dict(next(e for s, a, e in workers.CASES if (s, a) == (selector, alpha)))
    got = results[0][(selector, alpha)]
    want = exact_entmax(data["q"][0], data["k"], data["v"], data["lengths"], alpha)
    torch.testing.assert_close(got["out"], want, **TOL)
    assert got["certified"].all() and (got["delta_bound"] == 0).all()
    config = EntmaxKVConfig(selector=selector, alpha=alpha, page_size=workers.PAGE, **extra)
    single = unsharded_step(config, data["q"][0], data["k"], data["v"], data["lengths"])
    torch.testing.assert_close(got["out"], single.out, **TOL)
    torch.testing.assert_close(got["tau"], single.tau, atol=1e-6, rtol=1e-6)
    assert torch.equal(got["certified"], single.certified)


@pytest.mark.parametrize("selector,alpha", [(s, a) for s, a, _ in workers.CASES if s in ("topk", "gaussian")])
def test_selective_output_is_exact_entmax_over_the_union_of_the_ranks_selections(ranks, selector, alpha):
    world, results = ranks
    data = workers.global_data()
    tokens = global_tokens([results[r][(selector, alpha)] for r in range(world)], world)
    got = results[0][(selector, alpha)]
    want = exact_entmax(data["q"][0], data["k"], data["v"], data["lengths"], alpha, tokens)
    torch.testing.assert_close(got["out"], want, **TOL)
    full = exact_entmax(data["q"][0], data["k"], data["v"], data["lengths"], alpha)
    certified = got["certified"]
    if selector == "gaussian" and alpha == 2.0:  # report_bound: a certificate must be right where given
        assert certified.any()
        torch.testing.assert_close(got["out"][certified], full[certified], **TOL)
        assert (got["delta_bound"][certified] == 0).all() and (got["delta_bound"] <= 1).all()
    else:
        assert not certified.any() and (got["delta_bound"] == 1).all()
    if selector == "topk":  # each rank keeps its own budget: at most budget tokens per rank and KV head
        for rank in range(world):
            assert (results[rank][(selector, alpha)]["num_selected"] <= 16 // workers.PAGE).all()


def test_collectives_per_step_are_few_and_fixed(ranks):
    world, results = ranks
    levels = TauSettings().levels
    assert results[0][("dense", 1.5)]["calls"][0] == levels + 3
    assert results[0][("certified", 1.5)]["calls"][0] == 2 * levels + 5


def test_appends_land_on_the_owning_rank_and_certified_steps_stay_exact(ranks):
    world, results = ranks
    data = workers.global_data()
    k, v = data["k"].clone(), data["v"].clone()
    lengths = torch.tensor([44, 23, 0])
    for step, got in enumerate(results[0]["appends"]):
        for b in range(3):
            k[b, :, lengths[b]] = data["k_new"][step, b, :, 0]
            v[b, :, lengths[b]] = data["v_new"][step, b, :, 0]
        lengths = lengths + 1
        want = exact_entmax(data["q"][step + 1], k, v, lengths, 1.5)
        torch.testing.assert_close(got["out"], want, **TOL)
        assert got["certified"].all()
        for rank in range(1, world):
            assert torch.equal(results[rank]["appends"][step]["out"], got["out"])
    assert all(results[rank]["valid"].all() for rank in range(world))


def test_an_append_out_of_order_is_never_certified_and_still_exact(ranks):
    """The owning rank's statistics lose their order: it reads all its pages (the output stays
    full entmax) and its flag withdraws the certificate of that sequence only."""
    world, results = ranks
    data = workers.global_data()
    gap = results[0]["gap"]
    k = torch.cat([results[r]["gap"]["k"] for r in range(world)], 2)
    v = torch.cat([results[r]["gap"]["v"] for r in range(world)], 2)
    want = exact_entmax(data["q"][1], k, v, gap["lengths"], 1.5)
    torch.testing.assert_close(gap["out"], want, **TOL)
    assert not gap["certified"][0].any() and gap["certified"][1:].all()
    owner = 45 // (workers.CAPACITY // world)
    assert [bool(results[r]["gap"]["valid"][0]) for r in range(world)] == [r != owner for r in range(world)]


def test_one_process_float32_matches_the_unsharded_step():
    """Without a process group the decoder is the whole cache on one rank; float32 in, float32
    arithmetic as the single-process step (within float32 rounding)."""
    data = workers.global_data()
    q, k, v = (data[name].float() for name in ("q", "k", "v"))
    for selector in ("dense", "certified"):
        config = EntmaxKVConfig(selector=selector, alpha=1.5, page_size=workers.PAGE)
        decoder = ContextParallelDecoder(config, **workers.SHAPE, capacity=workers.CAPACITY, dtype=torch.float32,
                                         device="cpu", implementation=reference_implementation())
        assert decoder.comm.world_size == 1 and decoder.local_capacity == workers.CAPACITY
        decoder.load(k, v, data["lengths"])
        got = decoder.run(q[0], data["lengths"])
        single = unsharded_step(config, q[0], k, v, data["lengths"])
        torch.testing.assert_close(got.out, single.out, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got.out.double(), exact_entmax(data["q"][0], data["k"], data["v"],
                                                                  data["lengths"], 1.5), atol=1e-4, rtol=1e-4)
        assert got.certified.all() and got.out.dtype == torch.float32
        assert decoder.collective_calls()[0] == (5 if selector == "dense" else 9)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_two_gpus_over_nccl_equal_full_entmax(monkeypatch):
    """fp16 on two GPUs: dense and certified equal full entmax (computed in float64 from the same
    fp16 data) within fp16 output rounding; every stage runs the Triton kernels."""
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.setenv(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    # the workers compile the kernels for their GPU whatever this process runs them on (the suite
    # sets the interpreter for CPU kernel tests; a spawned worker imports Triton afresh)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    selectors = ("dense", "gaussian", "certified")
    ranks = spawn(workers.context_parallel_on_gpus, 2, args=(selectors,), backend="nccl", timeout_s=300)
    data = ranks[0]
    want = exact_entmax(data["q"].double(), data["k"].double(), data["v"].double(), data["lengths"], 1.5)
    for selector in selectors:
        got = ranks[0][selector]
        assert got["kernel_path"], selector  # the decode kernels in parts
        assert got["fallbacks"] == 0, (selector, got["fallbacks"])  # no overflow
        assert torch.equal(got["out"], ranks[1][selector]["out"])
        if selector != "gaussian":
            torch.testing.assert_close(got["out"].double(), want, atol=2e-3, rtol=2e-3)
            assert got["certified"].all()


@pytest.mark.parametrize("alpha", [2.0, 1.5, 4 / 3, 1.25, 1.3, 1.7])
def test_global_threshold_on_one_process_is_the_exact_threshold(alpha):
    g = torch.Generator().manual_seed(3)
    comm = Collectives()
    for n, spread in ((7, 1.0), (300, 2.0), (300, 0.01)):
        x = torch.randn(2, 3, n, generator=g, dtype=torch.float64) * spread
        mask = torch.rand(2, 3, n, generator=g) < 0.7
        mask[..., 0] = True
        solved = global_threshold(comm, x, mask, alpha)
        assert solved.exact.all()
        torch.testing.assert_close(solved.tau, entmax_threshold(x, alpha, mask=mask), atol=1e-12, rtol=0)
        assert torch.equal(solved.lower, solved.tau)


def test_global_threshold_flags_a_bracket_it_could_not_close_and_keeps_a_lower_bound():
    """Many tied scores at the threshold exceed the gather: not exact, and ``lower`` still bounds tau."""
    cluster = 2.0 + 1e-4 * torch.arange(1, 201, dtype=torch.float64) / 200  # all within the threshold's bin
    x = torch.cat([cluster, torch.tensor([3.0], dtype=torch.float64)]).reshape(1, 1, -1)
    solved = global_threshold(Collectives(), x, torch.ones_like(x, dtype=torch.bool), 2.0,
                              TauSettings(levels=1, gather_cap=4))
    assert not solved.exact.any()
    assert (solved.lower <= entmax_threshold(x, 2.0)).all()


def test_edge_rows_nothing_attended_and_poisoned():
    x = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0] = False
    x[1, 2] = float("nan")
    solved = global_threshold(Collectives(), x, mask, 1.5)
    assert solved.tau[0] == float("inf") and torch.isnan(solved.tau[1]) and torch.isfinite(solved.tau[2])
    assert not solved.exact[1] and solved.exact[2]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="certify_sketch"):
        ContextParallelDecoder(EntmaxKVConfig(selector="certified", certify_sketch="int8"), **workers.SHAPE,
                               capacity=32, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="q_heads"):
        ContextParallelDecoder(batch=1, q_heads=3, kv_heads=2, head_dim=8, capacity=32, dtype=torch.float32,
                               device="cpu")
    with pytest.raises(ValueError, match="gather_cap"):
        ContextParallelDecoder(**workers.SHAPE, capacity=32, dtype=torch.float32, device="cpu",
                               tau=TauSettings(gather_cap=0))
    decoder = ContextParallelDecoder(**workers.SHAPE, capacity=32, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="k and v must both be"):
        decoder.load(torch.zeros(3, 2, 40, 8), torch.zeros(3, 2, 40, 8), torch.tensor([1, 1, 1]))
    q = torch.zeros(3, 4, 1, 8)
    with pytest.raises(ValueError, match=r"seqlens must lie in \[1, 32\]"):
        decoder.check(q, torch.tensor([1, 33, 2]))
    with pytest.raises(ValueError, match="q must be torch.float32"):
        decoder.check(q.double(), torch.tensor([1, 2, 2]))
    with pytest.raises(ValueError, match=r"k_new must be a tensor \(3, 2, 1, 8\)"):
        decoder.check(q, torch.tensor([1, 2, 2]), torch.zeros(3, 2, 8), torch.zeros(3, 2, 1, 8), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="group was given"):
        Collectives(group=object())


@pytest.fixture(scope="module")
def kernel_ranks():
    """Results of :func:`workers.context_parallel_kernel_cases` on 2 ranks."""
    from entmaxkv_compile.runtime import kernels

    if not kernels.available("cpu"):  # on a GPU machine the NCCL test below runs this path
        pytest.skip("the Triton kernels cannot run on the CPU (TRITON_INTERPRET=1 must be set before triton "
                    "is imported)")
    return spawn(workers.context_parallel_kernel_cases, 2, timeout_s=300)


@pytest.mark.parametrize("case", workers.KERNEL_CASES, ids=lambda c: f"{c[0]}-{c[1]}-cap{c[2]}-max{c[3]}")
def test_kernel_path_equals_full_entmax_on_two_ranks(kernel_ranks, case):
    """The global threshold from the local ones (local_kernels.py): every rank agrees, the output is
    full entmax (dense, certified) or entmax over the selection (gaussian) to float32 accuracy, and
    a head overflowing its gather is gathered again, or past ``kernel_max_cap`` falls back to the
    exact levels, instead of returning a wrong tau."""
    selector, alpha, cap, max_cap = case
    data = workers.global_data()
    got = kernel_ranks[0][case]
    assert got["kernel_path"]
    # 3 collectives (5 certified); a second gather where the first overflowed; a fallback adds the
    # pure-torch levels (max, 2 sums, gather)
    regathers = 1 if (cap, max_cap) == (1, 65536) else 0  # every head has more than one score to gather
    assert got["calls"] == (5 if selector == "certified" else 3) + regathers + 4 * got["fallbacks"]
    assert torch.equal(got["out"], kernel_ranks[1][case]["out"])
    assert got["fallbacks"] == (1 if max_cap == 1 else 0)
    tokens = None if selector != "gaussian" else global_tokens(
        {r: kernel_ranks[r][case] for r in range(2)}, 2)
    want = exact_entmax(data["q"][0], data["k"], data["v"], data["lengths"], alpha, tokens)
    torch.testing.assert_close(got["out"].double(), want, atol=2e-5, rtol=2e-5)
    _, tau = entmax_probs_and_threshold(
        (data["q"][0].reshape(3, 2, 2, 8) @ data["k"].transpose(-1, -2) / math.sqrt(8)),
        alpha, mask=((torch.arange(workers.CAPACITY)[None, :] < data["lengths"][:, None])[:, None, None, :]
                     & (True if tokens is None else tokens[:, :, None, :])).expand(3, 2, 2, workers.CAPACITY))
    torch.testing.assert_close(got["tau"].double(), tau.flatten(1), atol=2e-5, rtol=2e-5)
    if selector in ("dense", "certified"):
        assert got["certified"].all()


def test_kernel_path_appends_across_ranks_stay_exact_and_certified(kernel_ranks):
    data = workers.global_data()
    k, v = data["k"].clone(), data["v"].clone()
    lengths = torch.tensor([44, 23, 0])
    for step, got in enumerate(kernel_ranks[0]["appends"]):
        for b in range(3):
            k[b, :, lengths[b]] = data["k_new"][step, b, :, 0].float().double()
            v[b, :, lengths[b]] = data["v_new"][step, b, :, 0].float().double()
        lengths = lengths + 1
        want = exact_entmax(data["q"][step + 1].float().double(), k.float().double(), v.float().double(),
                            lengths, 1.5)
        torch.testing.assert_close(got["out"].double(), want, atol=2e-5, rtol=2e-5)
        assert got["certified"].all()
        assert torch.equal(kernel_ranks[1]["appends"][step]["out"], got["out"])


def test_kernel_path_a_nan_key_poisons_its_heads_only(kernel_ranks):
    """A NaN key on one rank: the two query heads of that KV head in that sequence are NaN and not
    certified on every rank; every other head is full entmax and certified."""
    data = workers.global_data()
    got = kernel_ranks[0]["poisoned"]
    assert torch.equal(got["out"].isnan(), kernel_ranks[1]["poisoned"]["out"].isnan())
    bad = torch.zeros(3, 4, dtype=torch.bool)
    bad[0, :2] = True
    assert got["out"][bad].isnan().all() and not got["certified"][bad].any()
    want = exact_entmax(data["q"][0].float().double(), data["k"].float().double(), data["v"].float().double(),
                        data["lengths"], 1.5)
    torch.testing.assert_close(got["out"][~bad].double(), want[~bad], atol=2e-5, rtol=2e-5)
    assert got["certified"][~bad].all()
