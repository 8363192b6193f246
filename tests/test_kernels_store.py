"""The tuned-config store: shipped GPU files parse, lookups fall back and never benchmark."""

import json

import pytest
import torch

from entmaxkv_compile.runtime.tuning import tuned


def test_shipped_configs_parse_and_cover_the_benchmarked_classes():
    files = sorted(tuned.CONFIG_DIR.glob("*.json"))
    assert files, "the wheel must ship at least one tuned GPU config"
    for path in files:
        data = json.loads(path.read_text())
        assert path.stem == tuned.gpu_slug(data["device"])
        decode = data["kernels"]["paged_decode"]
        for dtype in (torch.float16, torch.bfloat16):
            for group in (1, 4):
                params = decode[tuned.shape_class(dtype, 128, group, 16)]
                assert set(tuned.DEFAULTS["paged_decode"]) <= set(params)


def test_lookup_on_cpu_uses_the_interpreter_blocks():
    cfg = tuned.decode_config(torch.device("cpu"), torch.float16, 128, 4, 16)
    assert cfg == tuned.INTERPRETER["paged_decode"]


def test_unknown_gpu_falls_back_to_defaults(monkeypatch):
    monkeypatch.setattr(tuned, "device_name", lambda device: "Imaginary GPU 9000")
    cfg = tuned.lookup("paged_decode", torch.device("cuda"), "fp16-d128-g4-p16")
    assert cfg == tuned.DEFAULTS["paged_decode"]


def test_gpu_file_overrides_defaults_and_override_wins(monkeypatch, tmp_path):
    name = "Test GPU X"
    (tmp_path / f"{tuned.gpu_slug(name)}.json").write_text(json.dumps(
        {"device": name, "kernels": {"paged_decode": {"fp16-d64-g2-p16": {"BLOCK_N": 32}}}}))
    monkeypatch.setattr(tuned, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuned, "device_name", lambda device: name)
    tuned.load_store.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert tuned.lookup("paged_decode", cuda, "fp16-d64-g2-p16")["BLOCK_N"] == 32
        assert tuned.lookup("paged_decode", cuda, "other")["BLOCK_N"] == \
            tuned.DEFAULTS["paged_decode"]["BLOCK_N"]
        with tuned.override("paged_decode", {"BLOCK_N": 128}):
            assert tuned.lookup("paged_decode", cuda, "fp16-d64-g2-p16")["BLOCK_N"] == 128
        assert tuned.lookup("paged_decode", cuda, "fp16-d64-g2-p16")["BLOCK_N"] == 32
    finally:
        tuned.load_store.cache_clear()


def test_length_buckets_refine_a_shape_class(monkeypatch, tmp_path):
    name = "Test GPU Y"
    (tmp_path / f"{tuned.gpu_slug(name)}.json").write_text(json.dumps(
        {"device": name, "kernels": {"paged_decode": {
            "fp16-d64-g2-p16": {"BLOCK_N": 32, "num_warps": 8},
            "fp16-d64-g2-p16-nlong": {"BLOCK_N": 128}}}}))
    monkeypatch.setattr(tuned, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuned, "device_name", lambda device: name)
    tuned.load_store.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert [tuned.length_bucket(n) for n in (1, 65536, 65537, 524288, 1 << 20)] == \
            ["n64k", "n64k", "n512k", "n512k", "nlong"]
        short = tuned.decode_config(cuda, torch.float16, 64, 2, 16, capacity=32768)
        long = tuned.decode_config(cuda, torch.float16, 64, 2, 16, capacity=1 << 20)
        assert (short["BLOCK_N"], short["num_warps"]) == (32, 8)
        assert (long["BLOCK_N"], long["num_warps"]) == (128, 8)  # the bucket refines its class
    finally:
        tuned.load_store.cache_clear()


def test_sparse_entries_refine_a_bucket_only_for_page_selections(monkeypatch, tmp_path):
    name = "Test GPU Z"
    (tmp_path / f"{tuned.gpu_slug(name)}.json").write_text(json.dumps(
        {"device": name, "kernels": {"paged_decode": {
            "fp16-d64-g2-p16": {"tau_warps": 2, "BLOCK_N": 128},
            "fp16-d64-g2-p16-n512k": {"BLOCK_TAU": 64},
            "fp16-d64-g2-p16-n512k-sparse": {"tau_warps": 1, "MIN_SPLIT_PAGES": 8}}}}))
    monkeypatch.setattr(tuned, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuned, "device_name", lambda device: name)
    tuned.load_store.cache_clear()
    try:
        cuda = torch.device("cuda")
        dense = tuned.decode_config(cuda, torch.float16, 64, 2, 16, capacity=131072)
        sparse = tuned.decode_config(cuda, torch.float16, 64, 2, 16, capacity=131072, sparse=True)
        assert (dense["tau_warps"], dense["BLOCK_TAU"], dense["MIN_SPLIT_PAGES"]) == (2, 64, 1)
        assert (sparse["tau_warps"], sparse["BLOCK_TAU"], sparse["MIN_SPLIT_PAGES"]) == (1, 64, 8)
        assert sparse["BLOCK_N"] == 128  # the class and the bucket still apply beneath it
        other_bucket = tuned.decode_config(cuda, torch.float16, 64, 2, 16, capacity=1 << 20, sparse=True)
        assert other_bucket["tau_warps"] == 2  # no -sparse entry for nlong: the class's value
    finally:
        tuned.load_store.cache_clear()


def test_malformed_file_raises(monkeypatch, tmp_path):
    (tmp_path / "broken-gpu.json").write_text(json.dumps({"device": "Broken GPU"}))
    monkeypatch.setattr(tuned, "CONFIG_DIR", tmp_path)
    tuned.load_store.cache_clear()
    try:
        with pytest.raises(ValueError, match="kernels"):
            tuned.load_store("Broken GPU")
    finally:
        tuned.load_store.cache_clear()


def test_autotune_without_gpu_returns_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: autotune would run for real")
    from entmaxkv_compile.runtime.tuning.autotune import autotune_main

    assert autotune_main(["--quick"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


def test_decode_grid_fills_whole_waves_and_never_exceeds_the_pages(monkeypatch):
    from entmaxkv_compile.runtime import _common as cm

    monkeypatch.setattr(cm, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    # B * Hkv * splits is about programs_per_sm * SMs: one full wave at 4 programs per SM
    assert cm.decode_splits(1, 8, 65536, cuda, programs_per_sm=4) == 66
    assert cm.decode_splits(8, 8, 65536, cuda, programs_per_sm=4) == 9
    assert cm.decode_splits(1, 1, 65536, cuda, programs_per_sm=8) == 256  # capped
    assert cm.decode_splits(1, 8, 5, cuda, programs_per_sm=4) == 5  # never more splits than pages
    assert cm.decode_splits(64, 8, 65536, cuda, programs_per_sm=2) == 1


def test_autotune_picks_the_fastest_launch_and_then_the_latency_parameters(monkeypatch, tmp_path):
    """The search with a synthetic timer: the product stage finds the fastest launch config, the
    second stage the threshold levels' and V pass's warps and tiles, per length bucket, and the
    third the bucket's sparse entry on a decode of every ``stride``-th page."""
    from entmaxkv_compile.runtime.tuning import autotune

    def fake_ms(dtype, dim, group, page, length, params, stride=1):
        want_tau = 1 if length <= 65536 or stride > 1 else 4
        want_split = 8 if stride > 1 else 1
        return (abs(params["PROGRAMS_PER_SM"] - 4) + abs(params["BLOCK_N"] - 128) / 64
                + abs(params["tau_warps"] - want_tau) + abs(params["out_warps"] - 2)
                + abs(params["MIN_SPLIT_PAGES"] - want_split) / 8 + 1.0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Synthetic GPU")
    monkeypatch.setattr(autotune, "_time_decode", fake_ms)
    try:
        assert autotune.autotune_main(["--quick", "--lengths", "32768,1048576", "--out-dir", str(tmp_path)]) == 0
    finally:
        tuned.load_store.cache_clear()
    decode = json.loads((tmp_path / "synthetic-gpu.json").read_text())["kernels"]["paged_decode"]
    for key, tau_warps in (("fp16-d128-g4-p16-n64k", 1), ("fp16-d128-g4-p16-nlong", 4), ("bf16-d128-g1-p16", 4)):
        got = decode[key]
        assert (got["PROGRAMS_PER_SM"], got["BLOCK_N"], got["tau_warps"], got["out_warps"]) == (4, 128, tau_warps, 2)
        assert set(tuned.DEFAULTS["paged_decode"]) <= set(got)
    for key in ("fp16-d128-g4-p16-n64k-sparse", "fp16-d128-g4-p16-nlong-sparse", "bf16-d128-g1-p16-nlong-sparse"):
        got = decode[key]
        assert (got["PROGRAMS_PER_SM"], got["tau_warps"], got["MIN_SPLIT_PAGES"]) == (4, 1, 8)
