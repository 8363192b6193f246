"""The distributed benchmark's ``--smoke`` run on CPU: two gloo ranks, every row written."""

from __future__ import annotations

import json

from benchmarks import distributed as bench


def test_smoke_writes_both_parts_and_prints_the_table(tmp_path, capsys):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "distributed.json").read_text())
    assert meta["world"] == 2 and meta["preset"] == "smoke"
    cp = meta["context_parallel"]
    assert [r["selector"] for r in cp] == bench.PRESETS["smoke"]["selectors"]
    for r in cp:
        assert r["n_global"] == 2 * r["n_per_rank"]
        assert r["ms_cp"] > 0 and r["ms_one_rank"] > 0 and 0 <= r["collective_share"] <= 1
        assert r["collective_calls"] == 5 and r["collective_bytes"] > 0
        assert r["ms_kernels_one_gpu"] is None  # the kernel baseline is GPU only
    assert cp[0]["certified"] == 1.0  # dense is exact everywhere
    (tp,) = meta["tensor_parallel"]
    assert tp["tokens_identical"] and tp["max_logit_diff"] < 1e-4 and tp["steps"] == 4
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[1].startswith("context parallel") and "tensor parallel" in printed[-3]
