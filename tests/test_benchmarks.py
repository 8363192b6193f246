"""The benchmarks at tiny sizes on CPU: the smoke presets run and write their JSON, the exact-entmax
oracle is exact, and each data family has the property it is named for."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import data_families, e2e, exact, real_activations, report
from benchmarks import decode as decode_bench
from benchmarks.data_families import FAMILIES, generate, planted_page_mask, rope
from entmaxkv_compile import entmax

DECODE_ROW_KEYS = {"family", "batch", "hq", "hkv", "n", "dim", "dtype", "method", "ms", "bytes", "gbps", "floor_ms",
                   "selected", "rel_err", "certified", "graphed", "note", "speedup"}


@pytest.fixture(scope="module")
def decode_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    assert decode_bench.main(["--preset", "smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "decode.json").read_text())


def test_decode_smoke_writes_every_row(decode_smoke):
    out, meta = decode_smoke
    assert {"device", "torch", "triton", "date", "preset", "alpha", "page_size", "plan", "rows"} <= set(meta)
    rows = meta["rows"]
    assert len(rows) == len(FAMILIES) * len(decode_bench.METHODS)
    assert {(r["family"], r["method"]) for r in rows} == {(f, m) for f in FAMILIES for m in decode_bench.METHODS}
    for r in rows:
        assert DECODE_ROW_KEYS <= set(r), r
        if r["method"] == "cudnn":  # no cuDNN on CPU: a note, not a crash
            assert r["ms"] is None and "unavailable" in r["note"]
        else:
            assert r["ms"] > 0 and r["bytes"] > 0 and r["note"] is None, r
    assert list(out.glob("speedup_*.png"))


def test_decode_smoke_exact_methods_match_the_oracle(decode_smoke):
    _, meta = decode_smoke
    for r in meta["rows"]:
        if r["method"] in ("dense", "certified"):
            assert r["rel_err"] < 1e-4, r
            assert r["certified"] == 1.0, r
        if r["method"] == "dense":
            assert r["selected"] == 1.0
            n, kv = r["n"], r["batch"] * r["hkv"]
            assert r["bytes"] == 2 * kv * n * r["dim"] * 4  # K + V, fp32, no statistics
        if r["method"] == "topk":
            assert 0 < r["selected"] < 0.1
        if r["method"] == "flash":
            assert r["speedup"] == 1.0


def test_report_renders_saved_runs(decode_smoke, tmp_path, capsys):
    out, meta = decode_smoke
    text = report.tables(meta)
    assert text.splitlines()[-1].startswith("  cudnn: RuntimeError")  # notes close the summary
    assert all(f in text for f in FAMILIES)
    md = report.markdown(meta)
    assert "#### iid, B = 1, 4/2 heads, fp32" in md and "| 512 |" in md
    assert report.main([str(out), "--markdown", "--plot-dir", str(tmp_path)]) == 0
    assert "#### real" in capsys.readouterr().out
    assert list(tmp_path.glob("speedup_*.png"))


def test_e2e_smoke(tmp_path):
    assert e2e.main(["--preset", "smoke", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "e2e.json").read_text())
    methods = {r["method"]: r for r in meta["rows"]}
    expected = {"exact", "exact_softmax", "inductor", "sdpa_flash", *(f"entmaxkv_{s}" for s in e2e.SELECTORS)}
    assert set(methods) == expected
    for name, r in methods.items():
        assert r["note"] is None and r["ms_per_token"] > 0, r
        if name not in ("exact", "exact_softmax"):
            assert r["max_logit_err"] is not None
    # no Inductor on the smoke preset: the Dynamo graphs run the same ops as the eager model
    assert methods["inductor"]["max_logit_err"] == 0 and methods["sdpa_flash"]["max_logit_err"] == 0
    for exact_selector in ("entmaxkv_dense", "entmaxkv_certified"):
        assert methods[exact_selector]["max_logit_err"] < 1e-3 * max(1.0, methods["exact"]["logit_scale"])


@pytest.mark.parametrize("positions", ["device", "host"])
def test_e2e_positions_feed_the_same_steps(positions):
    """Device-side positions (views of one tensor, gpt-fast's loop) and host-built ones agree."""
    plan = dict(e2e.PRESETS["smoke"], positions=positions)
    feed = e2e.position_feed(plan, 100, 5)
    assert [feed(step).tolist() for step in range(5)] == [[100 + step] for step in range(5)]
    assert feed(2).shape == (1,) and feed(2).dtype == torch.int64


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25])
def test_exact_oracle_matches_entmax(alpha):
    torch.manual_seed(0)
    scores = 3 * torch.randn(2, 3, 700)
    scores[0, 0, 5] = 40.0  # one outlier: a support of one token
    got = exact.entmax_weights(scores, alpha)
    want = entmax(scores.double(), alpha=alpha, dim=-1)
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert got[0, 0, 5] == 1.0


def test_exact_decode_is_gqa_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    got = exact.exact_entmax_decode(q, k, v, 1.5, chunk=64)
    kk = k.repeat_interleave(2, 1)
    p = entmax((q @ kk.transpose(-1, -2)).double() / 4.0, alpha=1.5, dim=-1)
    assert torch.allclose(got.double(), p @ v.repeat_interleave(2, 1).double(), atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_are_deterministic_per_seed(family, monkeypatch):
    monkeypatch.setattr(data_families, "CHUNK", 128)  # several chunks at a tiny N
    shape = (1, 4, 2, 300, 64, torch.float16, "cpu")
    q, k, v = generate(family, *shape, seed=1)
    assert q.shape == (1, 4, 1, 64) and k.shape == v.shape == (1, 2, 300, 64)
    assert q.dtype == k.dtype == v.dtype == torch.float16 and k.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), generate(family, *shape, seed=1)))
    if family != "real":  # the recorded activations do not depend on the seed below L
        assert not torch.equal(k, generate(family, *shape, seed=2)[1])


@pytest.mark.parametrize("density", [0.005, 0.02, 0.08])
def test_planted_pages_hold_the_entmax_mass(density):
    n, pages = 1 << 14, (1 << 14) // 16
    mask = planted_page_mask(2, 2, pages, density, 16, 0, "cpu")
    assert (mask.sum(-1) == round(density * pages)).all()
    starts = (mask[..., 1:] & ~mask[..., :-1]).sum(-1) + mask[..., 0]
    assert (starts <= 16).all()  # at most 16 runs of consecutive pages
    q, k, _ = data_families.planted(2, 8, 2, n, 64, torch.float32, "cpu", 0, density=density)
    scores = q.reshape(2, 2, 4, 64) @ k.transpose(-1, -2) / 8.0
    p = exact.entmax_weights(scores, 1.5)
    on_planted = (p * mask.repeat_interleave(16, -1)[:, :, None, :]).sum(-1)
    assert on_planted.min() > 0.9
    iid_q, iid_k, _ = data_families.iid(2, 8, 2, n, 64, torch.float32, "cpu", 0)
    iid_p = exact.entmax_weights(iid_q.reshape(2, 2, 4, 64) @ iid_k.transpose(-1, -2) / 8.0, 1.5)
    assert (iid_p * mask.repeat_interleave(16, -1)[:, :, None, :]).sum(-1).mean() < 0.3


def _kurtosis(x: torch.Tensor) -> float:
    x = x.flatten().double()
    x = (x - x.mean()) / x.std()
    return float((x ** 4).mean())


def test_heavy_keys_have_heavy_tails():
    q, k, _ = generate("heavy", 1, 4, 2, 4096, 64, torch.float32, "cpu", 0)
    _, k_iid, _ = generate("iid", 1, 4, 2, 4096, 64, torch.float32, "cpu", 0)
    assert _kurtosis(k) > 6.0 and abs(_kurtosis(k_iid) - 3.0) < 0.2
    assert _kurtosis(q.reshape(1, 2, 2, 64) @ k.transpose(-1, -2)) > 6.0  # the scores too
    assert abs(float(k.var()) - 1.0) < 0.5  # unit coordinate variance, up to the tail's noise


def test_lowrank_keys_are_low_rank_before_rope():
    n = 2048
    _, k, _ = generate("lowrank_rope", 1, 4, 2, n, 64, torch.float32, "cpu", 0)
    for name, keys, lo, hi in (("unrotated", rope(k, -torch.arange(n)), 0.99, 1.0), ("rotated", k, 0.0, 0.6)):
        s = torch.linalg.svdvals(keys[0, 0].double())
        top8 = float((s[:8] ** 2).sum() / (s ** 2).sum())
        assert lo <= top8 <= hi, (name, top8)


def test_rope_inverts_and_matches_gpt_fast():
    from examples.zoo import gpt_fast

    x = torch.randn(1, 2, 10, 32)
    pos = torch.arange(5, 15)
    assert torch.allclose(rope(rope(x, pos), -pos), x, atol=1e-5)
    freqs = gpt_fast.precompute_freqs(15, 32)[pos]  # gpt-fast layout: [B, T, H, D]
    want = gpt_fast.apply_rotary(x.transpose(1, 2), freqs).transpose(1, 2)
    assert torch.allclose(rope(x, pos), want, atol=1e-4)


def test_real_family_keeps_the_model_scores(monkeypatch):
    monkeypatch.setattr(real_activations, "REAL_CONTEXT", 96)
    n, d = 200, 128
    q, k, v = generate("real", 1, 4, 2, n, d, torch.float32, "cpu", 0)
    rq, rk, rv = real_activations.record(96, "cpu")
    assert (k[..., 64:] == 0).all() and (q[..., 64:] == 0).all() and (v[..., 64:] == 0).all()
    assert torch.equal(k[0, 1, -96:, :64], rk[1, -96:]) and torch.equal(v[0, 0, -96:, :64], rv[0, -96:])
    # scores under the benchmark's scale equal the model's q.k / sqrt(64)
    model_scores = rq[0, 0] @ rk[0].T / 8.0
    assert torch.allclose(q[0, 0, 0] @ k[0, 0, -96:].T / math.sqrt(d), model_scores, atol=1e-4)
    # earlier rows: noisy copies of the recording, period 96
    early = k[0, 0, n - 96 - 50: n - 96, :64]
    copy = rk[0, -50:]
    assert 0 < float((early - copy).std()) < 0.2 * float(rk[0].std(0).max())


def test_decode_failures_become_notes(tmp_path, monkeypatch):
    original = decode_bench.Case._ours

    def flaky(self, method, row):
        if method == "topk":
            raise RuntimeError("simulated kernel failure")
        return original(self, method, row)

    monkeypatch.setattr(decode_bench.Case, "_ours", flaky)
    # D = 32 is below the recorded head dim: the "real" configuration fails in its setup
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--families", "real,iid", "--dim", "32",
            "--methods", "flash,dense,topk"]
    assert decode_bench.main(argv) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    setup = [r for r in rows if r["family"] == "real"]
    assert len(setup) == 1 and setup[0]["method"] == "(setup)" and "head dim" in setup[0]["note"]
    iid = {r["method"]: r for r in rows if r["family"] == "iid"}
    assert iid["topk"]["ms"] is None and iid["topk"]["note"] == "RuntimeError: simulated kernel failure"
    assert iid["dense"]["ms"] > 0 and iid["flash"]["ms"] > 0


def test_e2e_planted_fill_is_aligned_with_each_layer():
    """Every layer's first-step queries put most of their exact entmax mass on the planted pages."""
    plan = dict(e2e.PRESETS["smoke"], contexts=[512])
    context = 512
    fill = e2e.planted_fill(plan, context, seed=0)
    model = e2e.build(plan, context, "own_entmax15", fill)
    hq, hkv, d = plan["heads"], plan["kv_heads"], plan["head_dim"]
    masses = []

    def hook(module, args):
        x, freqs, _ = args
        q = module.wqkv(x)[..., : hq * d].view(1, 1, hq, d)
        q = gpt_fast_rotary(q, freqs).transpose(1, 2).float()  # [1, Hq, 1, D]
        k = module.kv_cache.k_cache[:, :, :context].float().repeat_interleave(hq // hkv, 1)
        p = exact.entmax_weights((q @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(d), 1.5)  # [1, Hq, N]
        index = len(masses)
        pages = module.kv_cache.k_cache.shape[2] // 16  # the fill covers the whole static buffer
        mask = planted_page_mask(1, hkv, pages, 0.02, 16, index, "cpu")
        tokens = mask.repeat_interleave(16, -1)[..., :context].repeat_interleave(hq // hkv, 1)
        masses.append(float((p * tokens).sum(-1).min()))

    from examples.zoo.gpt_fast import apply_rotary as gpt_fast_rotary

    for layer in model.layers:
        layer.attention.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([context]))
    assert len(masses) == plan["layers"] and min(masses) > 0.9, masses


def test_certificate_benchmarks_run_small(tmp_path):
    """The CPU benchmarks of the certificate (pages read, dropped-mass bounds, candidate counts)
    run end to end at a small size and check what they report."""
    from benchmarks import candidate_counts, certified_pages, delta_bounds

    assert certified_pages.main(["--out", str(tmp_path), "--tokens", "1024", "--families", "planted2"]) == 0
    assert delta_bounds.main(["--out", str(tmp_path), "--tokens", "1024", "--families", "iid"]) == 0
    rows = json.loads((tmp_path / "delta_bounds.json").read_text())["rows"]
    assert {r["selector"] for r in rows} == {"gaussian", "topk"}
    assert all(r["token_bound_mean"] <= r["page_bound_mean"] + 1e-6 for r in rows)
    counts = candidate_counts.counts("iid", 128 * 128)
    assert counts["global_rule"] <= counts["split_rule"] and counts["support_median"] >= 1
