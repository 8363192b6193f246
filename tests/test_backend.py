"""The ``"entmaxkv"`` torch.compile backend: registration, options, Inductor hand-off, generated code."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from entmaxkv_compile.compiler.backend import BackendSettings, entmaxkv_backend
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.compiler.explain import explain, recording
from examples.zoo import gpt_fast


def test_backend_is_registered_by_entry_point_name():
    assert "entmaxkv" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("entmaxkv") is entmaxkv_backend
    from entmaxkv_compile.compiler.backend import torch_compile_backend

    assert torch_compile_backend() == "entmaxkv"  # installed: by name, not the object


def test_options_map_onto_config_mode_and_inductor():
    settings = BackendSettings.parse({"selector": "topk", "token_budget": 64, "page_size": 8,
                                      "mode": "reduce-overhead", "max_autotune": False})
    assert settings.config == EntmaxKVConfig(selector="topk", token_budget=64, page_size=8)
    assert settings.mode == "reduce-overhead" and settings.compiler == "inductor"
    patches = settings.config_patches()
    assert patches["triton.cudagraphs"] is True and patches["max_autotune"] is False
    assert BackendSettings.parse(None, mode="max-autotune").config_patches()["max_autotune"] is True
    assert BackendSettings.parse({"compiler": "eager"}).compiler == "eager"
    assert BackendSettings.parse({}).mask_row_start == "example"
    assert BackendSettings.parse({"mask_row_start": "always"}).mask_row_start == "always"


@pytest.mark.parametrize("options,mode,error,match", [
    ({"selectr": "topk"}, None, ValueError, "selectr"),
    ({"selector": "bogus"}, None, ValueError, "selector"),
    ({"page_size": 12}, None, ValueError, "page_size"),
    ({"compiler": "tvm"}, None, ValueError, "compiler"),
    ({"mask_row_start": "sometimes"}, None, ValueError, "mask_row_start"),
    ({"mode": "fast"}, None, ValueError, "mode"),
    ({"mode": "reduce-overhead"}, "max-autotune", ValueError, "mode given twice"),
    (["selector"], None, TypeError, "options must be a dict"),
])
def test_bad_options_raise_clear_errors(options, mode, error, match):
    with pytest.raises(error, match=match):
        BackendSettings.parse(options, mode)


@pytest.mark.parametrize("kwargs", [dict(mode="reduce-overhead"), dict(options={"mode": "reduce-overhead"})])
def test_mode_reaches_inductor_through_torch_compile(kwargs, monkeypatch):
    import entmaxkv_compile.compiler.backend as backend

    seen = []

    def hand_off(gm, example_inputs, settings):
        seen.append(settings)
        return gm.forward

    monkeypatch.setattr(backend, "_hand_off", hand_off)
    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=1), batch=1)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="entmaxkv", **kwargs)(torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
    [settings] = seen
    assert settings.mode == "reduce-overhead"
    assert settings.config_patches()["triton.cudagraphs"] is True


def _decode_code_is_sparse(code: str, cache_shape: tuple[int, ...]) -> None:
    """The compiled decode step: stats append + decode_step, no entmax, no cache-sized temporaries."""
    assert code.count("torch.ops.entmaxkv.page_stats_append.default(") == 2
    assert code.count("torch.ops.entmaxkv.decode_step.default(") == 2
    assert "entmaxkv.entmax.default" not in code
    shape = re.escape(str(cache_shape).replace(" ", "")[1:-1]).replace(",", r",\s*")
    assert not re.search(r"empty_strided\w*\(\(" + shape + r"\)", code), "a full-cache-sized buffer is allocated"
    assert not re.search(r"\.copy_\(|aten\.cat|clone\(", code.split("def call(")[-1]), "a cache copy"


def _decode_recording_code(model, page_size: int):
    """``(decode, codes)``: ``model`` compiled with the backend (certified, one round), and the list
    that receives the generated code of its first call."""
    torch._dynamo.reset()
    decode = torch.compile(model, backend="entmaxkv", options={"selector": "certified", "page_size": page_size,
                                                               "certify_max_rounds": 1, "compile_threads": 1})
    codes = []

    def first_decode_records_code(token, pos):
        if codes:
            return decode(token, pos)
        out, code = run_and_get_code(decode, token, pos)
        codes.extend(code)
        return out

    return first_decode_records_code, codes


def test_inductor_decode_is_exact_and_copies_no_cache():
    """64 greedy steps with Inductor (CPU): certified logits equal the eager model's within 1e-5."""
    args = gpt_fast.ModelArgs(n_layer=2)
    reference, model = gpt_fast.build(args, batch=2), gpt_fast.build(args, batch=2)
    prompt = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    want_tokens, want_logits = gpt_fast.generate(reference, prompt, 64)
    decode, codes = _decode_recording_code(model, page_size=16)
    with recording() as report:
        tokens, logits = gpt_fast.generate(model, prompt, 64, decode=decode, prefill=model)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    assert [s.status for s in report.sites] == ["rewritten", "rewritten"]
    cache_shape = tuple(model.layers[0].attention.kv_cache.k_cache.shape)
    _decode_code_is_sparse("\n".join(codes), cache_shape)


def test_inductor_ragged_decode_is_exact_and_copies_no_cache():
    """A ragged batch (one position per sequence, ``k_cache[arange(B), :, pos] = k``) through Inductor
    (CPU): 16 certified greedy steps equal the eager model's, and the compiled step appends and
    decodes without a cache copy. (A ``scatter_`` write is copied whole by Inductor itself, with or
    without this backend: see docs/backend.md.)"""
    from examples.zoo import ZOO

    entry = ZOO["ragged_positions"]
    reference, model = entry.build(), entry.build()
    prompt = torch.randint(1, 96, (entry.batch, 12), generator=torch.Generator().manual_seed(5))
    lengths = gpt_fast.ragged_lengths(entry.batch, 12)
    want_tokens, want_logits = gpt_fast.generate_ragged(reference, prompt, lengths, 16)
    decode, codes = _decode_recording_code(model, page_size=4)
    with recording() as report:
        tokens, logits = gpt_fast.generate_ragged(model, prompt, lengths, 16, decode=decode)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    assert [s.status for s in report.sites] == ["rewritten"] * entry.layers
    code = "\n".join(codes)
    assert code.count("torch.ops.entmaxkv.decode_step.default(") == entry.layers
    assert code.count("torch.ops.entmaxkv.page_stats_append.default(") == entry.layers
    cache = model.layers[0].attention.kv_cache.k_cache
    shape = re.escape(str(tuple(cache.shape)).replace(" ", "")[1:-1]).replace(",", r",\s*")
    assert not re.search(r"empty_strided\w*\(\(" + shape + r"\)", code), "a full-cache-sized buffer is allocated"
    assert not re.search(r"aten\.cat|clone\(", code.split("def call(")[-1]), "a cache copy"


def test_explain_prints_a_table_of_every_site():
    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=2, weights="sparsemax"), batch=1)
    prompt = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        model(prompt, torch.arange(6))
    torch._dynamo.reset()
    report = explain(model, prompt[:, -1:], torch.tensor([6]))
    assert [(s.where, s.kind, s.alpha, s.status, s.phase) for s in report.sites] == [
        ("layers.0.attention", "entmax", 2.0, "rewritten", "decode"),
        ("layers.1.attention", "entmax", 2.0, "rewritten", "decode"),
    ]
    text = str(report)
    assert text.splitlines()[0].split() == ["graph", "phase", "where", "kind", "alpha", "status", "reason"]
    assert "layers.1.attention" in text and text.count("rewritten") == 2
    with pytest.raises(TypeError, match="model must be callable"):
        explain(42)


def test_compiled_step_tracks_append_order_and_stays_exact_when_a_position_is_skipped(zoo_step):
    """The backend's graphs keep each cache's append order on device: a skipped position is
    flagged (statistics not valid), the certified step then reads every page, and the logits
    stay the model's."""
    import copy

    from entmaxkv_compile.compiler.passes.static_state import STATS

    model, (token, pos) = zoo_step(context=21, batch=2, n_layer=1)
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    decode = torch.compile(model, backend="entmaxkv", options={"selector": "certified", "page_size": 16})
    k_cache = model.layers[0].attention.kv_cache.k_cache
    with torch.no_grad():
        for position in (21, 22, 23, 40, 41):  # 24..39 are skipped: never written, never appended
            at = torch.tensor([position])
            got, want = decode(token, at), reference(token, at)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            valid = STATS.lookup(k_cache, 16).valid
            assert bool(valid.all()) == (position < 40), position



def test_a_refused_site_is_logged_with_its_reason(caplog):
    """A site the backend cannot rewrite keeps dense attention: that is logged, never silent."""
    import logging

    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, window=8, sink=1), batch=1)  # a window with a sink: refused
    with torch.no_grad():
        model(torch.zeros(1, 12, dtype=torch.long), torch.arange(12))  # prefill, eager
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="entmaxkv_compile.compiler.backend"), torch.no_grad():
        compiled = torch.compile(model, backend="entmaxkv", options={"compiler": "eager"})
        compiled(torch.zeros(1, 1, dtype=torch.long), torch.tensor([12]))
    torch._dynamo.reset()
    [record] = [r for r in caplog.records if "not rewritten" in r.getMessage()]
    assert "layers.0.attention" in record.getMessage() and "keeps the model's dense attention" in record.getMessage()


def test_compiled_certified_step_runs_the_read_everything_fallback_and_stays_exact(zoo_step):
    """With ``certify_dense_above=0`` every probe step that reads a page sends the sequence to
    the dense fallback for ``certify_probe_every - 1`` steps: the compiled graph advances the
    counter it keeps with the statistics, and the logits stay the model's throughout."""
    import copy

    from entmaxkv_compile.compiler.passes.static_state import STATS

    model, (token, _) = zoo_step(context=40, batch=2, n_layer=1)
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    options = {"selector": "certified", "page_size": 16, "certify_dense_above": 0.0, "certify_probe_every": 3}
    decode = torch.compile(model, backend="entmaxkv", options=options)
    k_cache = model.layers[0].attention.kv_cache.k_cache
    skips = []
    with torch.no_grad():
        for position in range(40, 46):
            at = torch.tensor([position])
            torch.testing.assert_close(decode(token, at), reference(token, at), atol=1e-5, rtol=0)
            skips.append(STATS.lookup(k_cache, 16).certify_skip.tolist())
    torch._dynamo.reset()
    assert skips == [[2, 2], [1, 1], [0, 0], [2, 2], [1, 1], [0, 0]]


def test_explain_reports_its_own_call_after_other_shapes_were_compiled():
    """explain compiles with static shapes: an earlier compilation of the same model code with
    other sizes or constants (no torch._dynamo.reset between) must not make this call's sizes or
    constants (here the score temperature) symbolic graph inputs."""
    torch._dynamo.reset()
    for dim, max_seq_len, context, temperature in ((64, 96, 6, 4.0), (128, 160, 9, 1.0)):
        args = gpt_fast.ModelArgs(n_layer=1, dim=dim, max_seq_len=max_seq_len, temperature=temperature)
        model = gpt_fast.build(args, batch=1)
        prompt = torch.randint(0, 96, (1, context))
        with torch.no_grad():
            model(prompt, torch.arange(context))
        report = explain(model, prompt[:, -1:], torch.tensor([context]))
        assert [(s.status, s.phase) for s in report.sites] == [("rewritten", "decode")], str(report)
