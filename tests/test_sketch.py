"""The int8 key sketch (``runtime/sketch/reference.py``): its page bounds are never below the
float64 page max, are tight, ignore what they must ignore and never clear a page over a
non-finite key; appends keep it equal to a fresh prefill."""

import math

import pytest
import torch

from entmaxkv_compile.runtime.sketch.reference import (
    CODE_MAX,
    HALF_STEP,
    KeySketch,
    quantize_rows,
    sketch_bytes_per_head,
    sketch_page_bounds,
)

FAMILIES = ("iid", "planted", "student_t", "offset")


def sketch_case(family, *, seed=0, batch=2, hq=8, hkv=2, nmax=75, dim=48, page=16,
                dtype=torch.float32, alibi=False, device="cpu"):
    """q ``[B, Hq, 1, D]``, k ``[B, Hkv, Nmax, D]`` of ``family``, ragged int32 lengths (the
    first full, the others ending inside a page), ALiBi slopes or None."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, dim, generator=gen)
    k = torch.randn(batch, hkv, nmax, dim, generator=gen)
    if family == "planted":
        # a page-sized run of keys aligned with the group's first query: a few very high scores
        group = hq // hkv
        for b in range(batch):
            start = int(torch.randint(0, nmax - page, (1,), generator=gen))
            direction = q[b, ::group, 0]  # [Hkv, D]
            direction = direction / direction.norm(dim=-1, keepdim=True)
            k[b, :, start:start + page] += 4.0 * math.sqrt(dim) * direction[:, None]
    elif family == "student_t":
        # Student-t with 3 degrees of freedom: z / sqrt(chi2_3 / 3)
        chi2 = (torch.randn(3, batch, hkv, nmax, dim, generator=gen) ** 2).sum(0)
        k = k / (chi2 / 3).sqrt()
    elif family == "offset":
        k = k + 1e3
    elif family != "iid":
        raise ValueError(family)
    seqlens = torch.randint(max(1, nmax // 3), nmax + 1, (batch,), generator=gen, dtype=torch.int32)
    seqlens[0] = nmax
    if batch > 1:
        seqlens[1] = min(nmax, page + 3)  # a partial second page
    slopes = (torch.rand(hq, generator=gen) * 0.1).to(device) if alibi else None
    return q.to(device, dtype), k.to(device, dtype), seqlens.to(device), slopes


def true_page_max(q, k, seqlens, page, scale, slopes=None):
    """float64 ``[B, Hq, Npages]``: the exact largest score per page (``-inf`` where empty)."""
    batch, hq, _, dim = q.shape
    hkv, nmax = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    z = scale * torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), kk)
    rows = torch.arange(nmax, device=q.device)
    length = seqlens.to(torch.int64)
    if slopes is not None:
        z = z + slopes.double()[None, :, None] * (rows[None, None, :] - (length[:, None, None] - 1))
    z = torch.where(rows[None, None, :] < length[:, None, None], z, float("-inf"))
    num_pages = -(-nmax // page)
    z = torch.nn.functional.pad(z, (0, num_pages * page - nmax), value=float("-inf"))
    return z.reshape(batch, hq, num_pages, page).amax(-1)


def all_pages(codes, page):
    batch, hkv, nmax, _ = codes.shape
    return torch.ones(batch, hkv, -(-nmax // page), dtype=torch.bool, device=codes.device)


def check_valid(ub, true):
    """``ub`` is -inf exactly where the page is empty and never below the float64 max."""
    empty = true == float("-inf")
    assert torch.equal(ub == float("-inf"), empty)
    assert bool(torch.isfinite(ub[~empty]).all())
    gap = ub.double() - true
    assert bool((gap[~empty] >= 0).all()), f"bound below the true max by {-gap[~empty].min().item()}"
    return gap[~empty]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [16, 48, 64, 80])
def test_bound_never_below_true_page_max(family, dtype, dim):
    # GQA 4 with ALiBi on odd head dims' cases, MHA without elsewhere: every combination appears
    gqa = dim in (48, 80)
    hq, hkv = (8, 2) if gqa else (3, 3)
    q, k, seqlens, slopes = sketch_case(family, seed=dim, hq=hq, hkv=hkv, dim=dim, dtype=dtype,
                                        alibi=gqa)
    scale = 1 / math.sqrt(dim)
    sketch = KeySketch.from_cache(k, seqlens)
    ub = sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, 16),
                            page_size=16, scale=scale, alibi_slopes=slopes)
    assert ub.dtype == torch.float32 and ub.shape == (2, hq, 5)
    check_valid(ub, true_page_max(q, k, seqlens, 16, scale, slopes))


@pytest.mark.parametrize("page", [1, 4, 32])
def test_bound_valid_for_float64_inputs_and_other_page_sizes(page):
    q, k, seqlens, slopes = sketch_case("offset", seed=3, dim=80, dtype=torch.float64, alibi=True)
    sketch = KeySketch.from_cache(k, seqlens)
    ub = sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, page),
                            page_size=page, scale=0.37, alibi_slopes=slopes)
    check_valid(ub, true_page_max(q, k, seqlens, page, 0.37, slopes))


def test_bound_is_tight():
    """Slack in units of the query's score std: ~0.05 on iid keys (QUALITY.md measured 0.06-0.08
    at D = 128); a bound that dropped the half step or doubled it would fail either side."""
    q, k, seqlens, _ = sketch_case("iid", seed=5, batch=1, hq=4, hkv=1, nmax=2048, dim=64)
    scale = 1 / math.sqrt(64)
    sketch = KeySketch.from_cache(k, seqlens)
    ub = sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, 16),
                            page_size=16, scale=scale)
    true = true_page_max(q, k, seqlens, 16, scale)
    std = (scale * torch.einsum("hd,nd->hn", q[0, :, 0].double(), k[0, 0].double())).std(-1)
    slack = check_valid(ub, true).reshape(4, -1) / std[:, None]
    assert slack.median() < 0.1 and slack.mean() < 0.1, (slack.median(), slack.mean())
    assert slack.median() > 0.01  # the half-step error term is really there


def test_scales_round_up_and_codes_err_by_half_a_step():
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(6, 80, generator=gen, dtype=torch.float64)
    k[1] *= 1e-40  # subnormal in float32
    k[2] *= 1e30
    k[3, :32] = 0.0  # an all-zero group
    k[4] = torch.randint(-127, 128, (80,), generator=gen).double() * 3.0  # exact levels, ties
    codes, scales = quantize_rows(k)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (6, 3)
    groups = torch.nn.functional.pad(k, (0, 16)).reshape(6, 3, 32)
    s = scales.double()
    assert bool((s * CODE_MAX >= groups.abs().amax(-1)).all())
    assert bool((s[3, 0] == 0) & (codes[3, :32] == 0).all())
    c = torch.nn.functional.pad(codes.double(), (0, 16)).reshape(6, 3, 32)
    err = (groups - c * s[..., None]).abs()
    assert bool((err <= HALF_STEP * s[..., None]).all())
    assert bool((codes.abs() <= CODE_MAX).all())


def test_non_candidate_and_empty_pages_are_minus_inf():
    q, k, seqlens, slopes = sketch_case("planted", seed=2, nmax=80, alibi=True)
    sketch = KeySketch.from_cache(k, seqlens)
    gen = torch.Generator().manual_seed(0)
    cand = torch.rand(2, 2, 5, generator=gen) < 0.5
    ub = sketch_page_bounds(q, *sketch.buffers(), seqlens, cand, page_size=16, scale=0.2,
                            alibi_slopes=slopes)
    full = sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, 16),
                              page_size=16, scale=0.2, alibi_slopes=slopes)
    per_head = cand.repeat_interleave(4, dim=1)
    assert bool((ub[~per_head] == float("-inf")).all())
    assert torch.equal(ub[per_head], full[per_head])
    assert bool((full[1, :, 2:] == float("-inf")).all())  # past sequence 1's length (19)
    assert bool(torch.isfinite(full[1, :, :2]).all())


def test_rows_past_the_length_are_never_read():
    q, k, seqlens, _ = sketch_case("iid", seed=4, nmax=64)
    sketch = KeySketch.from_cache(k, seqlens)
    before = sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, 16),
                                page_size=16, scale=0.2)
    length = int(seqlens[1])
    sketch.scales[1, :, length:] = float("nan")
    sketch.codes[1, :, length:] = 127
    after = sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, 16),
                               page_size=16, scale=0.2)
    assert torch.equal(before, after)
    garbage = k.clone()
    garbage[1, :, length:] = float("nan")
    assert torch.equal(KeySketch.from_cache(garbage, seqlens).codes, sketch.codes.masked_fill(
        torch.arange(64)[None, None, :, None] >= seqlens[:, None, None, None].long(), 0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_keys_never_give_a_finite_bound(bad):
    q, k, seqlens, slopes = sketch_case("iid", seed=6, nmax=64, alibi=True)
    k[0, 1, 21, 5] = bad  # page 1 of KV head 1 (query heads 4..7)
    sketch = KeySketch.from_cache(k, seqlens)
    ub = sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, 16),
                            page_size=16, scale=0.2, alibi_slopes=slopes)
    hit = ub[0, 4:, 1]
    assert bool((hit.isnan() | (hit == float("inf"))).all()), hit
    others = torch.ones_like(ub, dtype=torch.bool)
    others[0, 4:, 1] = False
    others &= ub != float("-inf")
    assert bool(torch.isfinite(ub[others]).all())


def test_appends_after_prefill_equal_a_prefill_of_the_longer_prefix():
    q, k, _, _ = sketch_case("student_t", seed=7, nmax=70, dim=80, dtype=torch.bfloat16)
    short = torch.tensor([13, 30], dtype=torch.int32)
    sketch = KeySketch.from_cache(k, short)
    for step in range(20):  # crosses page boundaries at ragged positions
        sketch.append(k, short + step)
    longer = KeySketch.from_cache(k, short + 20)
    assert torch.equal(sketch.codes, longer.codes)
    assert torch.equal(sketch.scales.view(torch.int16), longer.scales.view(torch.int16))


def test_append_outside_the_cache_writes_nothing():
    _, k, seqlens, _ = sketch_case("iid", seed=8, nmax=40)
    sketch = KeySketch.from_cache(k, seqlens)
    codes, scales = sketch.codes.clone(), sketch.scales.clone()
    sketch.append(k, torch.tensor([40, -1], dtype=torch.int32), check_values=False)
    assert torch.equal(codes, sketch.codes) and torch.equal(scales, sketch.scales)
    with pytest.raises(ValueError, match="positions must lie"):
        sketch.append(k, torch.tensor([40, 3], dtype=torch.int32))


def test_bytes_and_shapes():
    sketch = KeySketch.allocate(2, 8, 100, 128, dtype=torch.float16, device="cpu")
    assert sketch.bytes_per_token() == 8 * 136 and sketch_bytes_per_head(128) == 136
    assert sketch_bytes_per_head(48) == 48 + 4 and sketch_bytes_per_head(80) == 80 + 6
    codes, scales = sketch.buffers()
    assert codes.shape == (2, 8, 100, 128) and scales.shape == (2, 8, 100, 4)
    assert sketch.bytes_per_token() * 100 * 2 == codes.nbytes + scales.nbytes


def test_bad_arguments_name_what_is_wrong():
    q, k, seqlens, _ = sketch_case("iid", seed=9, nmax=32)
    sketch = KeySketch.from_cache(k, seqlens)
    codes, scales = sketch.buffers()
    cand = all_pages(codes, 16)
    kw = dict(page_size=16, scale=0.2)
    with pytest.raises(ValueError, match="candidates must be a bool tensor"):
        sketch_page_bounds(q, codes, scales, seqlens, cand.int(), **kw)
    with pytest.raises(ValueError, match="candidates must be a bool tensor"):
        sketch_page_bounds(q, codes, scales, seqlens, cand[:, :, :1], **kw)
    with pytest.raises(ValueError, match="scales must be a bfloat16"):
        sketch_page_bounds(q, codes, scales.half(), seqlens, cand, **kw)
    with pytest.raises(ValueError, match="must be a multiple"):
        sketch_page_bounds(q[:, :7], codes, scales, seqlens, cand, **kw)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        sketch_page_bounds(q, codes, scales, seqlens, cand, page_size=16, scale=-1.0)
    with pytest.raises(TypeError, match="cache dtype"):
        sketch.prefill(k.half(), seqlens)
    with pytest.raises(ValueError, match="does not match this sketch"):
        sketch.append(k[:, :, :16], torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        KeySketch.allocate(1, 1, 4, 0, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("dim", [48, 64])
def test_bound_holds_on_worst_case_rounding(dim):
    """Keys just below a half step, each on the side of its query channel's sign: the rounding
    error is nearly ``(1/2) sum_g s_g sum |q_d|``, the bound's whole error term, on every token."""
    gen = torch.Generator().manual_seed(dim)
    q = torch.randn(1, 1, 1, dim, generator=gen)
    groups = -(-dim // 32)
    absmax = 127.0 * torch.rand(1, 1, 32, 1, generator=gen, dtype=torch.float64) * 3
    _, scales = quantize_rows(absmax.float().expand(1, 1, 32, dim))  # the scales it will get
    step = scales.double().repeat_interleave(32, dim=-1)[..., :dim]
    levels = torch.randint(-120, 121, (1, 1, 32, dim), generator=gen).double()
    k = step * (levels + 0.49 * torch.sign(q[0, 0, 0]).double())
    k[..., ::32] = absmax  # each group's absmax, so the scales are those above
    q[..., ::32] = 0.0  # and the absmax channels add no error of their own
    seqlens = torch.tensor([32], dtype=torch.int32)
    sketch = KeySketch.from_cache(k.float(), seqlens)
    ub = sketch_page_bounds(q, *sketch.buffers(), seqlens, all_pages(sketch.codes, 1),
                            page_size=1, scale=1.0)
    true = true_page_max(q, k.float(), seqlens, 1, 1.0)
    gap = check_valid(ub, true)
    err_term = 0.5 * (sketch.scales.double()[0, 0, :, :, None]
                      * torch.nn.functional.pad(q[0, 0, 0].abs().double(), (0, groups * 32 - dim)
                                                ).reshape(groups, 32)[None]).sum((-1, -2))
    assert bool((gap <= 0.05 * err_term).all())  # the error really was near its bound


@pytest.mark.parametrize("budget", [1, 6 * 40 + 1])
def test_prefill_in_row_spans_equals_one_pass(monkeypatch, budget):
    """The sketch prefill walks the cache in row spans of bounded size (float32 copies of a whole
    8 x 1M-token cache ran out of memory on the H200): one row per span, or a few, equal one pass."""
    from entmaxkv_compile.runtime import _common

    torch.manual_seed(4)
    k = torch.randn(2, 3, 77, 40, dtype=torch.bfloat16)
    k[1, 2, 5, 0] = float("inf")
    seqlens = torch.tensor([77, 30])
    whole = KeySketch.from_cache(k, seqlens, check_values=False)
    monkeypatch.setattr(_common, "REFERENCE_CHUNK_ELEMENTS", budget)
    pieces = KeySketch.from_cache(k, seqlens, check_values=False)
    assert torch.equal(whole.codes, pieces.codes)
    assert torch.equal(whole.scales.nan_to_num(7.0), pieces.scales.nan_to_num(7.0))
