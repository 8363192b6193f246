"""A paged KV cache read through a block table (``runtime/paged.py``) against the contiguous path.

For random pools with a shuffled table, odd lengths (a partial last page), GQA, fp32/fp16,
alpha 1.5 and 2 and every selector, the step over the pool equals the contiguous step over the
cache the table describes (the kernels bit for bit: same tokens, same order of arithmetic), and
certified equals full entmax. The identity table over a pool copied from a contiguous cache is
today's path bit for bit; table entries past a row's pages (out-of-range ids, a NaN block) are
never read; statistics prefill/append per physical block equal those of the gathered cache.
Kernels: Triton interpreter on CPU, tiny shapes.
"""

import math

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE

from entmaxkv_compile import metrics
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.math.reference import entmax_probs_and_threshold
from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.decode import sparse_decode
from entmaxkv_compile.runtime.decoder import Decoder
from entmaxkv_compile.runtime.paged import gather_cache, gather_stats, pool_from_cache
from entmaxkv_compile.runtime.stats.paged import PagedKVStats
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.runtime.step import reference_implementation, run_step

PAGE = 8
BATCH, HQ, HKV, DIM, MAX_PAGES, BLOCKS = 3, 4, 2, 16, 5, 20
SEQLENS = [37, 19, 8]  # a partial last page, a short row, one exact page
SELECTORS = ["dense", "topk", "gaussian", "certified"]
GARBAGE_ID = 10**6  # an entry past a row's pages: never to be dereferenced


def _paged_case(seed, dtype, device="cpu"):
    """``(q, k_pool, v_pool, table, seqlens)``: a shuffled table over a pool with spare blocks;
    entries past each row's pages hold an out-of-range id or the id of a NaN block."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(BATCH, HQ, 1, DIM, generator=gen) * 2).to(device=device, dtype=dtype)
    k_pool = torch.randn(BLOCKS, PAGE, HKV, DIM, generator=gen).to(device=device, dtype=dtype)
    v_pool = torch.randn(BLOCKS, PAGE, HKV, DIM, generator=gen).to(device=device, dtype=dtype)
    nan_block = BLOCKS - 1
    k_pool[nan_block] = float("nan")
    v_pool[nan_block] = float("nan")
    ids = torch.randperm(BLOCKS - 1, generator=gen)[:BATCH * MAX_PAGES].view(BATCH, MAX_PAGES)
    seqlens = torch.tensor(SEQLENS, dtype=torch.int32)
    past = torch.arange(MAX_PAGES)[None, :] * PAGE >= seqlens[:, None]
    garbage = torch.where(torch.arange(MAX_PAGES)[None, :] % 2 == 0, GARBAGE_ID, nan_block)
    table = torch.where(past, garbage, ids).to(torch.int32)
    return q, k_pool, v_pool, table.to(device), seqlens.to(device)


def _contiguous(k_pool, v_pool, table, seqlens):
    return gather_cache(k_pool, table, seqlens, PAGE), gather_cache(v_pool, table, seqlens, PAGE)


def _step(impl, config, q, k, v, seqlens, stats, alpha, **kwargs):
    return run_step(impl, q, k, v, seqlens, stats.buffers(), config, alpha=alpha, scale=1 / math.sqrt(DIM),
                    stats_valid=stats.valid_for(seqlens), **kwargs)


def _full_entmax(q, k, v, seqlens, alpha):
    """Brute force, float64: entmax over each row's first ``seqlens[b]`` tokens."""
    group = HQ // HKV
    out = torch.zeros(BATCH, HQ, 1, DIM, dtype=torch.float64)
    for b in range(BATCH):
        n = int(seqlens[b])
        keys = k[b, :, :n].double().cpu().repeat_interleave(group, 0)
        values = v[b, :, :n].double().cpu().repeat_interleave(group, 0)
        p, _ = entmax_probs_and_threshold((q[b].double().cpu() @ keys.transpose(-1, -2)) / math.sqrt(DIM), alpha,
                                          dim=-1)
        out[b] = p @ values
    return out


def _assert_same_result(paged, contiguous):
    for name in ("out", "tau", "page_indices", "num_selected", "certified", "delta_bound"):
        got, want = getattr(paged, name), getattr(contiguous, name)
        assert torch.equal(got, want), f"{name} differs between the table and the contiguous path"


def _paged_stats(k_pool, table, seqlens, dtype, prefill=None):
    stats = PagedKVStats.allocate(BLOCKS, HKV, DIM, batch=BATCH, max_pages=MAX_PAGES, page_size=PAGE,
                                  dtype=dtype, device=k_pool.device)
    if prefill is None:
        stats.prefill(k_pool, seqlens, table)
    else:
        prefill(k_pool, seqlens, PAGE, *stats.buffers(), table)
        stats.valid.fill_(True)
        stats.last_position.copy_(seqlens.to(torch.int64) - 1)
    return stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("selector", SELECTORS)
def test_reference_table_equals_contiguous_on_gathered_cache(selector, alpha, dtype):
    q, k_pool, v_pool, table, seqlens = _paged_case(0, dtype)
    k, v = _contiguous(k_pool, v_pool, table, seqlens)
    config = EntmaxKVConfig(selector=selector, page_size=PAGE, token_budget=2 * PAGE)
    impl = reference_implementation()
    paged = _step(impl, config, q, k_pool, v_pool, seqlens, _paged_stats(k_pool, table, seqlens, dtype), alpha,
                  block_table=table)
    contiguous = _step(impl, config, q, k, v, seqlens, KVPageStats.from_cache(k, seqlens, PAGE), alpha)
    _assert_same_result(paged, contiguous)
    assert bool(torch.isfinite(paged.out).all())  # the NaN block past the rows was never read


@pytest.mark.kernels
@pytest.mark.parametrize("alpha,dtype", [(1.5, torch.float32), (2.0, torch.float32), (1.5, torch.float16)])
@pytest.mark.parametrize("selector", SELECTORS)
def test_kernel_table_equals_contiguous_on_gathered_cache(selector, alpha, dtype):
    q, k_pool, v_pool, table, seqlens = _paged_case(1, dtype, DEVICE)
    k, v = _contiguous(k_pool, v_pool, table, seqlens)
    config = EntmaxKVConfig(selector=selector, page_size=PAGE, token_budget=2 * PAGE)
    paged_stats = _paged_stats(k_pool, table, seqlens, dtype, prefill=kernels.stats_prefill_)
    flat = KVPageStats.allocate(BATCH, HKV, MAX_PAGES * PAGE, DIM, PAGE, dtype, DEVICE)
    kernels.stats_prefill_(k, seqlens, PAGE, *flat.buffers())
    flat.last_position.copy_(seqlens.to(torch.int64) - 1)
    paged = _step(kernels, config, q, k_pool, v_pool, seqlens, paged_stats, alpha, block_table=table)
    contiguous = _step(kernels, config, q, k, v, seqlens, flat, alpha)
    _assert_same_result(paged, contiguous)
    assert bool(torch.isfinite(paged.out).all())
    if selector == "certified":
        assert bool(paged.certified.all())
        want = _full_entmax(q, k, v, seqlens, alpha)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert float(metrics.relative_error(paged.out.double().cpu(), want)) < tol


@pytest.mark.kernels
def test_identity_table_is_todays_path_bit_for_bit():
    """The contiguous cache as a pool with the identity table: the same results, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    nmax = MAX_PAGES * PAGE - 3  # a capacity that ends inside a page
    q = (torch.randn(BATCH, HQ, 1, DIM, generator=gen) * 2).to(DEVICE)
    k = torch.randn(BATCH, HKV, nmax, DIM, generator=gen).to(DEVICE)
    v = torch.randn(BATCH, HKV, nmax, DIM, generator=gen).to(DEVICE)
    seqlens = torch.tensor(SEQLENS, dtype=torch.int32, device=DEVICE)
    k_pool, table = pool_from_cache(k, PAGE)
    v_pool, _ = pool_from_cache(v, PAGE)
    flat = KVPageStats.allocate(BATCH, HKV, nmax, DIM, PAGE, torch.float32, DEVICE)
    kernels.stats_prefill_(k, seqlens, PAGE, *flat.buffers())
    flat.last_position.copy_(seqlens.to(torch.int64) - 1)
    paged_stats = PagedKVStats.allocate(BATCH * MAX_PAGES, HKV, DIM, batch=BATCH, max_pages=MAX_PAGES,
                                        page_size=PAGE, device=DEVICE)
    kernels.stats_prefill_(k_pool, seqlens, PAGE, *paged_stats.buffers(), table)
    paged_stats.last_position.copy_(seqlens.to(torch.int64) - 1)
    used = (torch.arange(MAX_PAGES, device=DEVICE)[None, :] * PAGE < seqlens[:, None]).flatten()
    for per_row, per_block in zip(flat.buffers(), paged_stats.buffers()):
        as_blocks = per_row.permute(0, 2, 1, 3).reshape(BATCH * MAX_PAGES, HKV, DIM)
        assert torch.equal(as_blocks[used], per_block[used])
    for selector in SELECTORS:
        config = EntmaxKVConfig(selector=selector, page_size=PAGE, token_budget=2 * PAGE)
        paged = _step(kernels, config, q, k_pool, v_pool, seqlens, paged_stats, 1.5, block_table=table)
        _assert_same_result(paged, _step(kernels, config, q, k, v, seqlens, flat, 1.5))


@pytest.mark.kernels
def test_flashinfer_hnd_pool_through_a_transposed_view():
    """FlashInfer's HND storage ``[num_blocks, Hkv, P, D]`` passed as ``transpose(1, 2)``."""
    q, k_pool, v_pool, table, seqlens = _paged_case(3, torch.float32, DEVICE)
    k_hnd = k_pool.transpose(1, 2).contiguous().transpose(1, 2)
    v_hnd = v_pool.transpose(1, 2).contiguous().transpose(1, 2)
    assert k_hnd.stride() != k_pool.stride()
    config = EntmaxKVConfig(selector="certified", page_size=PAGE)
    stats = _paged_stats(k_hnd, table, seqlens, torch.float32, prefill=kernels.stats_prefill_)
    nhd_stats = _paged_stats(k_pool, table, seqlens, torch.float32, prefill=kernels.stats_prefill_)
    for a, b in zip(stats.buffers(), nhd_stats.buffers()):
        assert torch.equal(a, b)
    _assert_same_result(_step(kernels, config, q, k_hnd, v_hnd, seqlens, stats, 1.5, block_table=table),
                        _step(kernels, config, q, k_pool, v_pool, seqlens, nhd_stats, 1.5, block_table=table))


def _stats_prefill_and_appends(prefill, append, device):
    """Per-block statistics after a prefill and appends across a page boundary, and those of
    the gathered contiguous cache, kept the same way; unreferenced blocks keep a sentinel."""
    _, k_pool, _, table, seqlens = _paged_case(4, torch.float32, device)
    start = seqlens - 3  # prefilled 3 tokens short, then appended across a page boundary
    k_pool[BLOCKS - 1] = 0.0  # the spare NaN block becomes a fresh page for row 2
    table[2, 1] = BLOCKS - 1
    stats = PagedKVStats.allocate(BLOCKS, HKV, DIM, batch=BATCH, max_pages=MAX_PAGES, page_size=PAGE,
                                  device=device)
    for buf in stats.buffers():
        buf.fill_(123.0)  # a block no row lists must never be written
    prefill(k_pool, table, start, stats.buffers())
    flat = [torch.zeros(BATCH, HKV, MAX_PAGES, DIM, device=device) for _ in range(4)]
    contiguous_prefill = kernels.stats_prefill_ if prefill is _kernel_prefill else _reference_contiguous_prefill
    contiguous_prefill(gather_cache(k_pool, table, start, PAGE), start, PAGE, *flat)
    gen = torch.Generator().manual_seed(5)
    positions = start.clone()
    for _ in range(6):
        pos = positions.cpu().long()
        blocks = table.cpu().long()[torch.arange(BATCH), pos // PAGE]
        k_pool[blocks, pos % PAGE] = torch.randn(BATCH, HKV, DIM, generator=gen).to(device)
        append(k_pool, table, positions, stats.buffers())
        contiguous = gather_cache(k_pool, table, positions + 1, PAGE)
        (kernels.stats_append_ if prefill is _kernel_prefill else _reference_contiguous_append)(
            contiguous, positions, PAGE, *flat)
        positions += 1
    return stats, flat, table, positions


def _kernel_prefill(pool, table, lengths, stats):
    kernels.stats_prefill_(pool, lengths, PAGE, *stats, table)


def _kernel_append(pool, table, positions, stats):
    kernels.stats_append_(pool, positions, PAGE, *stats, table)


def _reference_prefill(pool, table, lengths, stats):
    from entmaxkv_compile.runtime.stats.paged import paged_stats_prefill_
    paged_stats_prefill_(pool, table, lengths, PAGE, *stats)


def _reference_append(pool, table, positions, stats):
    from entmaxkv_compile.runtime.stats.paged import paged_stats_append_
    paged_stats_append_(pool, table, positions, PAGE, *stats)


def _reference_contiguous_prefill(cache, lengths, page_size, *stats):
    from entmaxkv_compile.runtime.stats.reference import stats_prefill_
    stats_prefill_(cache, lengths, page_size, *stats)


def _reference_contiguous_append(cache, positions, page_size, *stats):
    from entmaxkv_compile.runtime.stats.reference import stats_append_
    stats_append_(cache, positions, page_size, *stats)


@pytest.mark.parametrize("path", ["reference", pytest.param("kernel", marks=pytest.mark.kernels)])
def test_stats_per_physical_block_equal_the_gathered_cache(path):
    device = DEVICE if path == "kernel" else "cpu"
    prefill, append = ((_kernel_prefill, _kernel_append) if path == "kernel"
                       else (_reference_prefill, _reference_append))
    stats, flat, table, positions = _stats_prefill_and_appends(prefill, append, device)
    gathered = gather_stats(table, positions, PAGE, *stats.buffers())
    used = (torch.arange(MAX_PAGES, device=device)[None, :] * PAGE < positions[:, None])
    for got, want in zip(gathered, flat):
        assert torch.equal(got.permute(0, 2, 1, 3)[used], want.permute(0, 2, 1, 3)[used])
    listed = torch.zeros(BLOCKS, dtype=torch.bool)
    listed[table.cpu().long()[used.cpu()]] = True
    for buf in stats.buffers():
        assert bool((buf[~listed.to(device)] == 123.0).all())  # no other block was touched


def test_decoder_and_sparse_decode_over_a_paged_cache_follow_the_contiguous_decoder():
    """A paged Decoder (prefill, appends, steps) equals a contiguous one on the gathered cache;
    ``sparse_decode(block_table=...)`` equals its first step."""
    q, k_pool, v_pool, table, seqlens = _paged_case(6, torch.float32)
    config = EntmaxKVConfig(selector="certified", page_size=PAGE)
    paged = Decoder(config, batch=BATCH, q_heads=HQ, kv_heads=HKV, head_dim=DIM, capacity=MAX_PAGES * PAGE,
                    dtype=torch.float32, device="cpu", num_blocks=BLOCKS)
    flat = Decoder(config, batch=BATCH, q_heads=HQ, kv_heads=HKV, head_dim=DIM, capacity=MAX_PAGES * PAGE,
                   dtype=torch.float32, device="cpu")
    lengths = seqlens - 2
    paged.prefill(k_pool, lengths, table)
    flat.prefill(gather_cache(k_pool, table, lengths, PAGE), lengths)
    once = sparse_decode(q, k_pool, v_pool, lengths, config, block_table=table)
    first = True
    for _ in range(2):
        got = paged.run(q, k_pool, v_pool, lengths, block_table=table)
        k, v = _contiguous(k_pool, v_pool, table, lengths)
        _assert_same_result(got, flat.run(q, k, v, lengths))
        if first:
            _assert_same_result(got, once)
            first = False
        assert bool(got.certified.all())
        paged.append(k_pool, lengths, table)
        flat.append(gather_cache(k_pool, table, lengths + 1, PAGE), lengths)
        lengths = lengths + 1


def test_paged_inputs_are_refused_with_clear_errors():
    q, k_pool, v_pool, table, seqlens = _paged_case(7, torch.float32)
    with pytest.raises(ValueError, match=r"block size \(8.*page_size \(16\)"):
        sparse_decode(q, k_pool, v_pool, seqlens, EntmaxKVConfig(page_size=16), block_table=table)
    bad = table.clone()
    bad[1, 0] = -1  # a page that holds tokens of row 1
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = -1 must be a block id in \[0, 20\)"):
        sparse_decode(q, k_pool, v_pool, seqlens, EntmaxKVConfig(page_size=PAGE), block_table=bad)
    with pytest.raises(ValueError, match=r"seqlens must lie in \[1, max_pages \* page_size = 40\]"):
        sparse_decode(q, k_pool, v_pool, seqlens + 30, EntmaxKVConfig(page_size=PAGE), block_table=table)
    with pytest.raises(TypeError, match="block_table must be int32"):
        sparse_decode(q, k_pool, v_pool, seqlens, EntmaxKVConfig(page_size=PAGE), block_table=table.long())
    with pytest.raises(ValueError, match="key sketch"):
        Decoder(EntmaxKVConfig(page_size=PAGE, selector="certified", certify_sketch="int8"), batch=BATCH,
                q_heads=HQ, kv_heads=HKV, head_dim=DIM, capacity=40, dtype=torch.float32, device="cpu",
                num_blocks=BLOCKS)
    contiguous = Decoder(EntmaxKVConfig(page_size=PAGE), batch=BATCH, q_heads=HQ, kv_heads=HKV, head_dim=DIM,
                         capacity=40, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="block_table"):
        contiguous.run(q, k_pool, v_pool, seqlens, block_table=table)


def test_block_table_benchmark_smoke(tmp_path):
    """The benchmark's CPU preset runs, writes its JSON, and both paths give the same output."""
    import json

    from benchmarks import block_table

    rows = block_table.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "block_table.json").read_text())["rows"]
    assert len(rows) == len(saved) == 2 and all("error" not in row for row in rows)
    assert all(row["identical"] for row in rows)
    assert all(row["contiguous_ms"] > 0 and row["table_ms"] > 0 for row in rows)
    # compact moments and launch parameters passed over the tuned ones
    rows = block_table.main(["--preset", "smoke", "--out", str(tmp_path), "--selectors", "gaussian_c",
                             "--decode-params", '{"SLOT_TILES": 0}'])
    saved = json.loads((tmp_path / "block_table.json").read_text())
    assert saved["decode_params"] == {"SLOT_TILES": 0}
    assert [row["selector"] for row in rows] == ["gaussian_c"] and rows[0]["identical"], rows


@pytest.mark.parametrize("selector", ["gaussian", "certified"])
def test_decode_step_op_takes_a_block_table(selector):
    """``entmaxkv::decode_step`` with ``block_table`` last: opcheck (schema, fake shapes) and the
    same result as the contiguous op on the gathered cache."""
    q, k_pool, v_pool, table, seqlens = _paged_case(8, torch.float32)
    k, v = _contiguous(k_pool, v_pool, table, seqlens)
    paged = _paged_stats(k_pool, table, seqlens, torch.float32).buffers()
    flat = KVPageStats.from_cache(k, seqlens, PAGE).buffers()
    params = (0.3, 1.5, PAGE, selector, 16, 0.99, 0.0, "auto", 0, 0, 1, 0)
    ops = torch.ops.entmaxkv
    rest = (None, None, 0.0, None, table)  # stats_valid, dense_rows, softcap, row_start, block_table
    torch.library.opcheck(ops.decode_step, (q, k_pool, v_pool, seqlens, *paged, None, *params, *rest))
    torch.library.opcheck(ops.decode_step, (q, k_pool, v_pool, seqlens, *paged, None, *params),
                          {"block_table": table})
    got = ops.decode_step(q, k_pool, v_pool, seqlens, *paged, None, *params, block_table=table)
    want = ops.decode_step(q, k, v, seqlens, *flat, None, *params)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.available("cuda")),
                    reason="needs a CUDA GPU: the decoder records CUDA graphs only there")
def test_paged_decoder_graph_replays_equal_eager_as_the_table_grows():
    """A paged Decoder replaying its CUDA graph (the table copied in each step) equals an eager
    one, while appends cross page boundaries and new blocks enter the table."""
    batch, hq, hkv, dim, max_pages, blocks, page = 2, 8, 2, 64, 12, 40, 16
    gen = torch.Generator(device="cuda").manual_seed(9)
    k_pool = torch.randn(blocks, page, hkv, dim, generator=gen, device="cuda", dtype=torch.float16)
    v_pool = torch.randn(blocks, page, hkv, dim, generator=gen, device="cuda", dtype=torch.float16)
    order = torch.randperm(blocks, generator=gen, device="cuda").to(torch.int32)
    table = torch.full((batch, max_pages), -1, dtype=torch.int32, device="cuda")
    lengths = torch.tensor([45, 30], dtype=torch.int32, device="cuda")
    free = 0
    for b in range(batch):  # the blocks of the prefilled pages; later ones as the rows grow
        for p in range(-(-int(lengths[b]) // page)):
            table[b, p] = order[free]
            free += 1
    config = EntmaxKVConfig(selector="certified", page_size=page)
    decoders = [Decoder(config, batch=batch, q_heads=hq, kv_heads=hkv, head_dim=dim, capacity=max_pages * page,
                        dtype=torch.float16, device="cuda", num_blocks=blocks, cuda_graph=graphed)
                for graphed in (True, False)]
    for decoder in decoders:
        decoder.prefill(k_pool, lengths, table)
    for _ in range(40):
        for b in range(batch):
            if int(lengths[b]) % page == 0:
                table[b, int(lengths[b]) // page] = order[free]
                free += 1
        q = torch.randn(batch, hq, 1, dim, generator=gen, device="cuda", dtype=torch.float16)
        for decoder in decoders:
            decoder.append(k_pool, lengths, table)
        graphed, eager = (d.run(q, k_pool, v_pool, lengths + 1, block_table=table) for d in decoders)
        _assert_same_result(graphed, eager)
        lengths = lengths + 1


@pytest.mark.kernels
@pytest.mark.parametrize("selector,alpha", [("gaussian", 1.3), ("certified", 1.5), ("topk", 2.0)])
def test_kernel_table_with_alibi_softcap_and_row_start(selector, alpha):
    """The step's other inputs ride along: ALiBi, a soft-cap and a per-row first position over a
    table equal the contiguous step (alpha 1.3: the gaussian selector's reference fallback)."""
    q, k_pool, v_pool, table, seqlens = _paged_case(10, torch.float32, DEVICE)
    k, v = _contiguous(k_pool, v_pool, table, seqlens)
    config = EntmaxKVConfig(selector=selector, page_size=PAGE, token_budget=2 * PAGE)
    paged_stats = _paged_stats(k_pool, table, seqlens, torch.float32, prefill=kernels.stats_prefill_)
    flat = KVPageStats.allocate(BATCH, HKV, MAX_PAGES * PAGE, DIM, PAGE, torch.float32, DEVICE)
    kernels.stats_prefill_(k, seqlens, PAGE, *flat.buffers())
    flat.last_position.copy_(seqlens.to(torch.int64) - 1)
    extra = dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE), softcap=4.0,
                 row_start=torch.tensor([11, 0, 3], dtype=torch.int32, device=DEVICE))
    paged = _step(kernels, config, q, k_pool, v_pool, seqlens, paged_stats, alpha, block_table=table, **extra)
    _assert_same_result(paged, _step(kernels, config, q, k, v, seqlens, flat, alpha, **extra))
    assert bool(torch.isfinite(paged.out).all())


@pytest.mark.parametrize("path", ["reference", pytest.param("kernel", marks=pytest.mark.kernels)])
def test_prefix_sharing_a_full_block(path):
    """Rows 0 and 1 share their first two blocks (a common prefix, full in both): the shared
    blocks' statistics describe their content, and each row's step equals its contiguous step."""
    device = DEVICE if path == "kernel" else "cpu"
    q, k_pool, v_pool, table, seqlens = _paged_case(11, torch.float32, device)
    table[1, :2] = table[0, :2]  # row 1 (19 tokens) shares row 0's first two full pages
    k, v = _contiguous(k_pool, v_pool, table, seqlens)
    assert torch.equal(k[0, :, :2 * PAGE], k[1, :, :2 * PAGE])
    prefill = kernels.stats_prefill_ if path == "kernel" else None
    paged = _paged_stats(k_pool, table, seqlens, torch.float32, prefill=prefill)
    flat = KVPageStats.from_cache(k, seqlens, PAGE)
    for got, want in zip(gather_stats(table, seqlens, PAGE, *paged.buffers()), flat.buffers()):
        if path == "reference":
            assert torch.equal(got, want)
        else:  # the kernel's sums run in another order than the reference's
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    impl = kernels if path == "kernel" else reference_implementation()
    config = EntmaxKVConfig(selector="certified", page_size=PAGE)
    result = _step(impl, config, q, k_pool, v_pool, seqlens, paged, 1.5, block_table=table)
    assert bool(result.certified.all())
    want = _full_entmax(q, k, v, seqlens, 1.5)
    assert float(metrics.relative_error(result.out.double().cpu(), want)) < 1e-5


@pytest.mark.kernels
def test_selected_blocks_kernel_equals_its_reference():
    """The K pass's one-launch lookup of the selected pages' blocks equals ``paged.selected_blocks``:
    -1 stays -1 (no page), every other slot is ``table[b, page]``, for a width that is not a
    power of two."""
    from conftest import on_kernel_device

    from entmaxkv_compile.runtime.attend.kernel import selected_blocks
    from entmaxkv_compile.runtime.paged import selected_blocks as reference

    gen = torch.Generator().manual_seed(4)
    table = torch.randperm(3 * 37, generator=gen).to(torch.int32).view(3, 37)
    pages = torch.randint(-1, 37, (3, 2, 29), generator=gen, dtype=torch.int32)
    got = on_kernel_device(selected_blocks, pages, table)
    assert got.dtype == torch.int32 and torch.equal(got, reference(pages, table))
