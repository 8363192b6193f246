"""Every entry of docs/EDGE_INPUTS.md: bad and edge inputs and what each gets.

The reference (pure torch) path is tested here on every input; the Triton kernels this package
owns outside the decode kernel (page statistics, selection, certificate) run under the CPU
interpreter (tests/conftest.py sets it).
"""

from __future__ import annotations

import entmax as pypi_entmax
import pytest
import torch

from entmaxkv_compile import EntmaxKVConfig, KVPageStats, entmax, entmax_threshold, gaussian_threshold
from entmaxkv_compile import sparse_decode
from entmaxkv_compile.runtime.stats.reference import stats_state_after_prefill_
from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.certify import reference as certify_reference
from entmaxkv_compile.runtime.select import reference as selection
from entmaxkv_compile.cli import check_output_path, main
from entmaxkv_compile.checks import check_decode_inputs, check_positions, check_seqlens

ALPHAS = [1.25, 4 / 3, 1.5, 1.75, 2.0]
NAN, INF = float("nan"), float("inf")


def bisection_entmax(x: torch.Tensor, alpha: float, iters: int = 200) -> torch.Tensor:
    """float64 entmax of the rows of ``x`` by plain bisection on tau (independent of the package)."""
    z = (alpha - 1) * x.double()
    z = z - z.amax(-1, keepdim=True)
    lo, hi = torch.full_like(z[..., :1], -1.0), torch.zeros_like(z[..., :1])
    for _ in range(iters):
        mid = (lo + hi) / 2
        big = (z - mid).clamp(min=0).pow(1 / (alpha - 1)).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    p = (z - (lo + hi) / 2).clamp(min=0).pow(1 / (alpha - 1))
    return p / p.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------- entmax


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("offset", [30.0, 1e3, 1e4])
def test_entmax_is_shift_invariant(alpha, offset):
    gen = torch.Generator().manual_seed(int(offset) + int(alpha * 100))
    x = (torch.randn(6, 80, generator=gen) * 0.1 + offset).float()
    p = entmax(x, alpha)
    exact = entmax(x.double(), alpha)  # float64 of the same float32 scores
    torch.testing.assert_close(p.double(), exact, atol=2e-6, rtol=0)
    torch.testing.assert_close(exact, pypi_entmax.entmax_bisect(x.double(), alpha=alpha, n_iter=100),
                               atol=1e-9, rtol=0)
    torch.testing.assert_close(p.double(), entmax(x - offset, alpha).double(), atol=2e-6, rtol=0)
    tau = entmax_threshold(x, alpha).double()
    torch.testing.assert_close(tau, entmax_threshold(x.double(), alpha), atol=offset * 1e-6, rtol=0)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_nan_or_pos_inf_attended_makes_the_row_nan(bad):
    x = torch.randn(3, 6)
    x[1, 2] = bad
    p = entmax(x, 1.5)
    assert torch.isnan(p[1]).all() and not torch.isnan(p[[0, 2]]).any()
    assert torch.isnan(entmax_threshold(x, 1.5)[1]) and torch.isfinite(entmax_threshold(x, 1.5)[[0, 2]]).all()
    assert torch.isnan(entmax(x, 1.25)[1]).all()  # the bracketed solve agrees


def test_masked_out_nan_is_ignored():
    x = torch.randn(2, 5, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = False
    y = x.clone()
    y[0, 1] = NAN
    torch.testing.assert_close(entmax(y, 1.5, mask=mask), entmax(x, 1.5, mask=mask))


def test_alpha_below_the_supported_minimum_is_rejected():
    for alpha in (1 + 1e-9, 1.005):
        with pytest.raises(ValueError, match=r"alpha must be >= 1.01"):
            entmax(torch.randn(3), alpha)
        with pytest.raises(ValueError, match=r"alpha must be >= 1.01"):
            EntmaxKVConfig(alpha=alpha)
        with pytest.raises(ValueError, match=r"alpha must be >= 1.01"):
            gaussian_threshold(0.0, 1.0, 100.0, alpha)


@pytest.mark.parametrize("alpha", [1.01, 1.02, 1.05])
def test_alpha_near_the_minimum_matches_bisection(alpha):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, generator=gen, dtype=torch.float64) * 3
    torch.testing.assert_close(entmax(x, alpha), bisection_entmax(x, alpha), atol=1e-10, rtol=0)
    torch.testing.assert_close(entmax(x.float(), alpha).double(), bisection_entmax(x, alpha), atol=2e-5, rtol=0)
    tau = gaussian_threshold(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]), 1000.0, alpha)
    assert torch.isfinite(tau).all()


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: entmax([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: entmax_threshold([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: entmax(torch.tensor(1.0)), ValueError, "0-d tensor"),
        (lambda: entmax_threshold(torch.tensor(1.0)), ValueError, "0-d tensor"),
        (lambda: entmax(torch.randn(2, 3), dim=2), ValueError, r"dim must be in \[-2, 2\)"),
        (lambda: entmax_threshold(torch.randn(2, 3), dim=-3), ValueError, "dim must be in"),
        (lambda: entmax(torch.randn(2, 3), dim=1.0), TypeError, "dim must be an int"),
        (lambda: entmax(torch.randn(2, 3), dim=True), TypeError, "dim must be an int"),
        (lambda: entmax(torch.randn(2, 3), mask=torch.ones(3, 2, dtype=torch.bool)), ValueError,
         "mask of shape .* must broadcast to x's shape"),
        (lambda: entmax(torch.randn(2, 3), mask=torch.ones(2, 2, 3, dtype=torch.bool)), ValueError,
         "must broadcast to x's shape"),
        (lambda: entmax_threshold(torch.randn(2, 3), mask=torch.ones(2, 3)), TypeError, "mask must be a bool"),
        (lambda: entmax(torch.randn(2, 3), mask=[True] * 3), TypeError, "mask must be a bool torch.Tensor"),
        (lambda: entmax(torch.randn(2, 0)), ValueError, "at least one entry"),
    ],
)
def test_entmax_bad_arguments_name_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()


# ----------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(max_quantile="0.5"), TypeError, "max_quantile must be a float, got str"),
        (dict(max_quantile=None), TypeError, "max_quantile must be a float, got NoneType"),
        (dict(margin=True), TypeError, "margin must be a float, got bool"),
        (dict(margin="0"), TypeError, "margin must be a float, got str"),
        (dict(alpha="1.5"), TypeError, "alpha must be a float"),
    ],
)
def test_config_wrong_types_name_the_field(kwargs, error, words):
    with pytest.raises(error, match=words):
        EntmaxKVConfig(**kwargs)


def test_gaussian_threshold_arguments_must_broadcast():
    with pytest.raises(ValueError, match=r"mu, sigma, n must broadcast to one shape, got mu \(3,\), sigma \(4,\)"):
        gaussian_threshold(torch.zeros(3), torch.ones(4), 10.0, 1.5)


# ------------------------------------------------------------------------------ value checks


def test_value_checks_skip_meta_tensors():
    q = torch.empty(1, 2, 1, 8, device="meta")
    k = torch.empty(1, 1, 16, 8, device="meta")
    lengths = torch.empty(1, dtype=torch.int64, device="meta")
    check_decode_inputs(q, k, k, lengths, torch.empty(2, device="meta"), check_values=True)
    check_seqlens(lengths, 1, 16, device=torch.device("meta"), check_values=True)
    check_positions(lengths, 1, 16, device=torch.device("meta"), check_values=True)
    stats = KVPageStats.allocate(1, 1, 16, 8, page_size=4, device="meta")
    stats.append(k, lengths, check_values=True)  # the order check also needs values: skipped


def test_nonfinite_alibi_slopes_are_rejected_by_the_value_checks():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        sparse_decode(q, k, k, torch.tensor([16]), alibi_slopes=torch.tensor([NAN, 0.1]))


# -------------------------------------------------------------------------------- decode


def _case(seed=0, batch=2, kv_heads=1, group=2, nmax=40, dim=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, 1, dim, generator=gen)
    k = torch.randn(batch, kv_heads, nmax, dim, generator=gen)
    v = torch.randn(batch, kv_heads, nmax, dim, generator=gen)
    return q, k, v, torch.full((batch,), nmax)


def _certify_both(q, stats, seqlens, result, slopes=None, stats_valid=None):
    """The certificate of ``result``'s selection by the reference and by the kernel."""
    args = (q, stats.kmin, stats.kmax, seqlens, result.page_indices, result.num_selected, result.tau)
    kw = dict(page_size=stats.page_size, alpha=1.5, scale=0.25, alibi_slopes=slopes, stats_valid=stats_valid)
    return certify_reference.certify(*args, **kw), kernels.certify(*args, **kw)


@pytest.mark.parametrize("where", ["k_nan", "k_pos_inf", "k_neg_inf", "q_nan", "slope_nan"])
@pytest.mark.parametrize("selector", ["gaussian", "topk", "certified", "dense"])
def test_nonfinite_inputs_are_never_certified(where, selector):
    q, k, v, seqlens = _case()
    slopes = torch.tensor([0.0, 0.1])
    if where.startswith("k_"):
        k[0, 0, 21, 3] = {"k_nan": NAN, "k_pos_inf": INF, "k_neg_inf": -INF}[where]
    elif where == "q_nan":
        q[0, 1, 0, 5] = NAN
    else:
        slopes = torch.tensor([NAN, 0.1])
    stats = KVPageStats.allocate(2, 1, 40, 16, page_size=16)
    kernels.stats_prefill_(k, seqlens, 16, *stats.buffers())  # the kernel keeps NaN, like the reference
    stats_state_after_prefill_(seqlens, 40, stats.last_position, stats.valid)  # as KVPageStats.prefill does
    ref_stats = KVPageStats.from_cache(k, seqlens, 16)
    for a, b in zip(stats.buffers(), ref_stats.buffers()):
        assert torch.equal(a.isnan(), b.isnan())
    config = EntmaxKVConfig(selector=selector, token_budget=16, report_bound=True)
    result = sparse_decode(q, k, v, seqlens, config, stats=stats, alibi_slopes=slopes, scale=0.25,
                                  check_values=False)
    untrusted = torch.zeros(2, 2, dtype=torch.bool)  # heads whose certificate rests on the bad value
    if where == "slope_nan":
        untrusted[:, 0] = True
    elif where == "q_nan":
        untrusted[0, 1] = True
    else:
        untrusted[0] = True
    if selector == "dense":
        # Dense reads every page: no bound is involved, so a head is certified exactly where its
        # tau is a number (a NaN/+inf score poisons it; a -inf score only drops its token).
        assert torch.equal(result.certified, torch.isfinite(result.tau))
        assert not result.certified[torch.isnan(result.out).any(-1).any(-1)].any()
    else:
        assert not result.certified[untrusted].any() and (result.delta_bound[untrusted] == 1.0).all()
    if selector not in ("topk", "dense"):  # the other heads are untouched (top-k with one page need not certify)
        assert result.certified[~untrusted].all()
    for certified, delta in _certify_both(q, stats, seqlens, result, slopes):
        assert not certified[untrusted].any() and (delta[untrusted] == 1.0).all()
    # a head whose attended scores hold a NaN or +inf gets a NaN output and tau; a -inf score
    # (K = -inf against q > 0, or +inf against q < 0) only drops its token
    scores = torch.einsum("bhd,bnd->bhn", q[:, :, 0].double(), k[:, 0].double()) * 0.25
    scores = scores + slopes.double()[None, :, None] * (torch.arange(40) - 39).double()
    poisoned = (torch.isnan(scores) | (scores == INF)).any(-1)
    assert torch.equal(torch.isnan(result.out).all(-1)[..., 0], poisoned)
    assert torch.equal(torch.isnan(result.tau), poisoned)


def test_nonfinite_page_is_kept_by_the_selectors():
    q, k, v, seqlens = _case(nmax=64)
    k[0, 0, 5, 0] = NAN  # page 0, far from the last page
    stats = KVPageStats.from_cache(k, seqlens, 16)
    kw = dict(page_size=16, alpha=1.5, scale=0.25, token_budget=32, max_quantile=0.99, margin=0.0,
              tau_estimate="global", sink_pages=0, recent_pages=0, min_context=0)
    for selector in ("gaussian", "topk"):
        for impl in (selection, kernels):
            indices, count = impl.select_pages(q, *stats.buffers(), seqlens, selector=selector, **kw)
            assert 0 in indices[0, 0, : int(count[0, 0])].tolist(), (selector, impl.__name__)


def test_zero_length_gives_zero_output_and_no_certificate():
    q, k, v, _ = _case()
    seqlens = torch.tensor([0, 40])
    stats = KVPageStats.from_cache(k, seqlens, 16, check_values=False)
    result = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(selector="dense"), stats=stats,
                                  check_values=False)
    assert torch.equal(result.out[0], torch.zeros_like(result.out[0]))
    assert torch.isinf(result.tau[0]).all() and (result.tau[0] > 0).all()
    assert not result.certified[0].any() and (result.delta_bound[0] == 1.0).all()
    for certified, delta in _certify_both(q, stats, seqlens, result):
        assert not certified[0].any() and (delta[0] == 1.0).all() and certified[1].all()


def test_length_beyond_capacity_reads_nothing_and_is_not_certified():
    q, k, v, _ = _case(nmax=40)  # 40 rows, 3 pages of 16: capacity 48 in whole pages
    seqlens = torch.tensor([45, 40])
    stats = KVPageStats.from_cache(k, seqlens, 16, check_values=False)
    kernel_stats = KVPageStats.allocate(2, 1, 40, 16, page_size=16)
    kernels.stats_prefill_(k, seqlens, 16, *kernel_stats.buffers())  # clamps to Nmax: no read past it
    clean = KVPageStats.from_cache(k, torch.tensor([40, 40]), 16)
    for a, b, c in zip(stats.buffers(), kernel_stats.buffers(), clean.buffers()):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)
    assert stats.valid.tolist() == [False, True]
    valid = stats.valid_for(seqlens)
    assert valid.tolist() == [False, True]
    result = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(selector="dense"), stats=stats,
                                  check_values=False)
    for certified, delta in _certify_both(q, stats, seqlens, result, stats_valid=valid):
        assert not certified[0].any() and (delta[0] == 1.0).all() and certified[1].all()
    # a position past the cache (or negative) reads and writes nothing, on both paths
    outside = torch.tensor([40, -1])
    for buffers, append in (
        (stats.buffers(), lambda: stats.append(k, outside, check_values=False)),
        (kernel_stats.buffers(), lambda: kernels.stats_append_(k, outside, 16, *kernel_stats.buffers())),
    ):
        before = [b.clone() for b in buffers]
        append()
        for old, new in zip(before, buffers):
            assert torch.equal(old, new)
    assert stats.valid.tolist() == [False, False]


@pytest.mark.parametrize("order", ["gap", "repeat", "rewind_inside_page"])
def test_out_of_order_append_is_flagged_and_never_certified(order):
    q, k, v, _ = _case(batch=1, nmax=48)
    stats = KVPageStats.from_cache(k, torch.tensor([20]), 16)
    position = {"gap": 22, "repeat": 19, "rewind_inside_page": 17}[order]
    with pytest.raises(ValueError, match=rf"positions must continue each sequence .* got position {position} "
                                         r"after position 19"):
        stats.append(k, torch.tensor([position]))
    assert stats.valid.all()  # the host check raised before touching anything
    stats.append(k, torch.tensor([position]), check_values=False)
    assert not stats.valid.any()
    seqlens = torch.tensor([position + 1])
    result = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(selector="dense"), stats=stats)
    for certified, delta in _certify_both(q, stats, seqlens, result, stats_valid=stats.valid_for(seqlens)):
        assert not certified.any() and (delta == 1.0).all()
    stats.prefill(k, seqlens)  # a prefill rebuilds the statistics and the flag
    assert stats.valid_for(seqlens).all()


def test_in_order_appends_and_page_boundary_rollback_stay_valid():
    _, k, _, _ = _case(batch=1, nmax=48)
    stats = KVPageStats.from_cache(k, torch.tensor([20]), 16)
    for position in (20, 21, 16, 17, 18):  # continue, then roll back to the page start 16
        stats.append(k, torch.tensor([position]))
    assert stats.valid.all() and stats.last_position.tolist() == [18]
    assert stats.valid_for(torch.tensor([19])).all() and not stats.valid_for(torch.tensor([22])).any()
    fresh = KVPageStats.from_cache(k, torch.tensor([19]), 16)
    torch.testing.assert_close(stats.kmin[:, :, 1], fresh.kmin[:, :, 1])


def test_nonfinite_v_outside_every_support_is_ignored():
    q, k, v, seqlens = _case()
    full = sparse_decode(q, k, v, seqlens, EntmaxKVConfig(selector="dense"))
    p = entmax(torch.einsum("bhd,bnd->bhn", q[:, :, 0], k[:, 0]) * 0.25, 1.5)
    outside = (p == 0).all(1)  # [B, N]: in no head's support
    assert outside.any()
    v_bad = torch.where(outside[:, None, :, None], NAN, v)
    again = sparse_decode(q, k, v_bad, seqlens, EntmaxKVConfig(selector="dense"))
    torch.testing.assert_close(again.out, full.out)


# ------------------------------------------------------------------------------------- CLI


def _factory(tmp_path, body="return torch.nn.Linear(2, 2), (torch.zeros(2),)"):
    path = tmp_path / "factory.py"
    path.write_text(f"import torch\n\ndef make():\n    {body}\n")
    return f"{path}:make"


@pytest.mark.parametrize(
    "output, words",
    [
        ("{tmp}", "is a directory"),
        ("{tmp}/sub/", "is a directory"),
        ("{tmp}/factory.py/x.pt2", "is not a directory"),
    ],
)
def test_cli_checks_the_output_path_before_loading_the_model(tmp_path, capsys, output, words):
    target = _factory(tmp_path, body="raise AssertionError('the model must not be loaded')")
    code = main(["rewrite", target, "-o", output.format(tmp=tmp_path), "-q"])
    assert code == 1 and words in capsys.readouterr().err


def test_cli_rejects_a_negative_tolerance(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", _factory(tmp_path), "-o", str(tmp_path / "x.onnx"), "--verify", "--tolerance", "-1"])
    assert info.value.code == 2 and "--tolerance: expected a finite number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "body, words",
    [
        ("return [torch.nn.Linear(2, 2), (torch.zeros(2),)]", "must return (model, example_decode_args), got list"),
        ("return torch.nn.Linear(2, 2), {'x': torch.zeros(2)}", "example_decode_args of type dict, expected a tuple"),
        ("return torch.nn.Linear(2, 2), None", "example_decode_args of type NoneType, expected a tuple"),
    ],
)
def test_cli_factory_must_return_a_model_and_an_args_tuple(tmp_path, capsys, body, words):
    code = main(["rewrite", _factory(tmp_path, body), "-o", str(tmp_path / "x.pt2"), "-q"])
    assert code == 1 and words in capsys.readouterr().err


def test_cli_bad_config_fails_before_loading_the_model(tmp_path, capsys):
    target = _factory(tmp_path, body="raise AssertionError('the model must not be loaded')")
    assert main(["rewrite", target, "-o", str(tmp_path / "x.pt2"), "--alpha", "1.001", "-q"]) == 1
    assert "alpha must be >= 1.01" in capsys.readouterr().err


def test_cli_output_in_a_missing_directory_is_accepted_and_not_created_early(tmp_path):
    target = tmp_path / "new" / "deeper" / "step.pt2"
    assert check_output_path(str(target)) == target
    assert not (tmp_path / "new").exists()  # created by the save, after the work succeeded


def test_every_published_edge_input_names_an_existing_test():
    """docs/EDGE_INPUTS.md: each table row cites ``file::test``; each cited test must exist."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    rows = [line for line in (root / "docs" / "EDGE_INPUTS.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| input")]
    entries = [row for row in rows if row.count("|") >= 4]
    assert len(entries) >= 30
    for row in entries:
        cited = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row)
        assert cited, f"entry without a test: {row}"
        for file, name in cited:
            source = (root / "tests" / file).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"


@pytest.mark.parametrize("impl", [selection, kernels], ids=["reference", "kernels"])
@pytest.mark.parametrize("field, value", [("max_quantile", None), ("max_quantile", "0.5"), ("margin", True),
                                          ("margin", NAN)])
def test_select_pages_names_a_bad_scalar(impl, field, value):
    q, k, _, seqlens = _case()
    stats = KVPageStats.from_cache(k, seqlens, 16)
    kw = dict(page_size=16, alpha=1.5, scale=0.25, selector="gaussian", token_budget=32, max_quantile=0.99,
              margin=0.0, tau_estimate="global", sink_pages=0, recent_pages=0, min_context=0)
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        impl.select_pages(q, *stats.buffers(), seqlens, **kw)
