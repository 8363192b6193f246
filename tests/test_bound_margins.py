"""benchmarks/bound_margins.py: every bound is a valid upper bound of each page's max q.k, and the
script writes the JSON it documents."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.bound_margins import BOUNDS, main, measure, page_bounds


@pytest.mark.parametrize("shifted", [False, True])
def test_bounds_dominate_every_page_max(shifted: bool) -> None:
    g = torch.Generator().manual_seed(3)
    k = torch.randn(512, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 64, dtype=torch.float64)
    if shifted:  # an offset mean and a few outlier tokens, so no bound is trivially loose
        k = k + 2.0
        k[::37] *= 10.0
    q = torch.randn(5, 64, generator=g, dtype=torch.float64)
    out = page_bounds(q, k)
    true = (q @ k.T).reshape(5, 32, 16).amax(-1)
    assert torch.equal(out["true"], true)
    for name in BOUNDS:
        assert out[name].shape == true.shape, name
        assert bool((out[name] >= true - 1e-9 * (1 + true.abs())).all()), name
    assert bool((out["min(box,ball)"] <= out["box"]).all())
    # the int8 sketch is far tighter than the box on random keys
    assert float((out["int8"] - true).median()) < 0.2 * float((out["box"] - true).median())


def test_measure_counts_no_support_pages() -> None:
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 256, 32, generator=g)
    q = torch.randn(2, 2, 32, generator=g)
    r = measure(q, k, scale=32 ** -0.5)
    z = 0.5 * 32 ** -0.5 * torch.einsum("jgd,jnd->jgn", q.double(), k.double())
    from entmaxkv_compile.math.reference import entmax_threshold

    tau = entmax_threshold(z / 0.5, alpha=1.5, dim=-1)
    true = z.reshape(2, 2, 16, 16).amax(-1)
    assert r["no_support"] == pytest.approx(float((true <= tau[..., None]).double().mean()))
    for name in BOUNDS:
        s = r["bounds"][name]
        assert 0.0 <= s["gqa_clearable"] <= s["clearable"] <= r["no_support"], name
        assert s["median_slack_std"] >= 0.0, name


def test_script_writes_expected_json(tmp_path) -> None:
    payload = main(["--out", str(tmp_path), "--tokens", "512", "--hq", "4", "--hkv", "2", "--dim", "64",
                    "--families", "iid", "planted2", "--no-twin"])
    data = json.loads((tmp_path / "bound_margins.json").read_text())
    assert data == json.loads(json.dumps(payload))
    assert {"alpha", "page", "rank", "quant_group", "setup", "bytes_per_page_per_head", "results"} <= set(data)
    assert set(data["results"]) == {"iid N=512", "planted2 N=512"}
    for fam, r in data["results"].items():
        assert {"no_support", "gqa_no_support", "median_margin_std", "bounds"} <= set(r)
        assert set(r["bounds"]) == set(BOUNDS)
        for s in r["bounds"].values():
            assert {"clearable", "clearable_over_no_support", "gqa_clearable", "median_slack_std"} <= set(s)
        assert data["bytes_per_page_per_head"][fam]["box"] == 2 * 64 * 2
    assert (tmp_path / "bound_margins.png").stat().st_size > 1000
