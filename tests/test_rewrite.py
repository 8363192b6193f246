"""The offline rewrite: export -> passes -> rewritten program -> save -> load -> run."""

from __future__ import annotations

import copy

import pytest
import torch

from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.compiler.rewrite import RewriteResult, UnsupportedModelError, rewrite
from examples.zoo import ZOO, gpt_fast


def greedy_steps(step, first_args: tuple, steps: int) -> list[torch.Tensor]:
    """Logits of ``steps`` greedy decode steps starting with ``first_args``."""
    token, position = first_args
    outputs = []
    with torch.no_grad():
        for i in range(steps):
            logits = step(token, position + i)
            outputs.append(logits)
            token = logits[:, -1].argmax(-1, keepdim=True)
    return outputs


GPT_FAST_ENTRIES = [e for e in ZOO.values() if e.family == "gpt_fast"]


def zoo_entry_step(entry, context: int = 21, seed: int = 0):
    """A prefilled zoo model and its next decode step's arguments."""
    model = entry.build()
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.args.vocab_size, (2, context), generator=generator)
    with torch.no_grad():
        model(prompt, torch.arange(context))
    return model, (torch.randint(0, model.args.vocab_size, (2, 1), generator=generator), torch.tensor([context]))


@pytest.mark.parametrize("entry", [e for e in GPT_FAST_ENTRIES if e.decode_status == "rewritten"],
                         ids=lambda e: e.name)
def test_saved_program_reproduces_the_model(entry, tmp_path):
    model, args = zoo_entry_step(entry)
    eager = copy.deepcopy(model)
    result = rewrite(model, args, EntmaxKVConfig(selector="certified", page_size=8))
    assert isinstance(result, RewriteResult)
    assert [(s.kind, s.status) for s in result.report.sites] == [(entry.kind, "rewritten")] * entry.layers
    assert all(abs(s.alpha - entry.alpha) < 1e-9 for s in result.report.sites)
    path = result.save(tmp_path / "step.pt2")
    loaded = torch.export.load(str(path)).module()

    expected = greedy_steps(eager, args, 4)  # crosses the page boundary at 24
    got = greedy_steps(loaded, args, 4)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry", [e for e in GPT_FAST_ENTRIES if e.decode_status == "not-entmax"],
                         ids=lambda e: e.name)
def test_models_without_entmax_are_refused_with_the_site_table(entry):
    model, args = zoo_entry_step(entry)
    with pytest.raises(UnsupportedModelError) as info:
        rewrite(model, args)
    message = str(info.value)
    assert "no attention site" in message and "not-entmax" in message and "What to change" in message


def test_program_state_holds_prefilled_page_statistics(zoo_step):
    model, args = zoo_step(context=13, n_layer=1)
    result = rewrite(model, args, EntmaxKVConfig(page_size=4))
    state = result.program.state_dict
    stats_keys = sorted(k for k in state if k.startswith("entmaxkv."))
    assert len(stats_keys) == 4  # one K cache, four statistics buffers
    cache = model.layers[0].attention.kv_cache.k_cache
    expected = KVPageStats.from_cache(cache, torch.full((2,), 13), page_size=4)
    by_field = {k.rsplit(".", 1)[1]: state[k] for k in stats_keys}
    for name, buffer in zip(("kmin", "kmax", "kmean", "km2"), expected.buffers()):
        torch.testing.assert_close(by_field[name], buffer)
    # the model's own buffers keep their names in the rewritten program
    assert "layers.0.attention.kv_cache.k_cache" in {**state, **result.program.constants}


def test_rewrite_matches_the_compiled_backend(zoo_step):
    model, args = zoo_step(seed=3)
    compiled_model = copy.deepcopy(model)
    options = {"selector": "gaussian", "page_size": 8, "compiler": "eager"}
    compiled = torch.compile(compiled_model, backend="entmaxkv", options=options, fullgraph=True)
    loaded = rewrite(model, args, EntmaxKVConfig(selector="gaussian", page_size=8)).module()
    for e, g in zip(greedy_steps(compiled, args, 3), greedy_steps(loaded, args, 3)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_untraceable_step_is_reported():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python branch: torch.export cannot trace it
                return x + 1
            return x - 1

    with pytest.raises(UnsupportedModelError, match="torch.export could not trace"):
        rewrite(DataDependent(), (torch.randn(3),))


@pytest.mark.parametrize(
    "model, args, config, error, match",
    [
        ("not a model", (torch.zeros(1),), None, TypeError, "model must be a torch.nn.Module"),
        (torch.nn.Identity(), {"x": 1}, None, TypeError, "example_decode_args must be a tuple"),
        (torch.nn.Identity(), (torch.zeros(1),), {"selector": "topk"}, TypeError, "config must be an EntmaxKVConfig"),
    ],
)
def test_bad_arguments_name_the_argument(model, args, config, error, match):
    with pytest.raises(error, match=match):
        rewrite(model, args, config)


def test_progress_reports_each_long_step(zoo_step):
    model, args = zoo_step(n_layer=1)
    lines: list[str] = []
    rewrite(model, args, progress=lines.append)
    starts = [line for line in lines if line.endswith("...")]
    ends = [line for line in lines if "done in" in line]
    assert len(starts) == len(ends) >= 3
    assert any("exporting the decode step" in line for line in starts)
    assert any("graph passes" in line for line in starts)


HF_ENTRIES = [e for e in ZOO.values() if e.family == "hf"]


@pytest.mark.parametrize("entry", HF_ENTRIES, ids=lambda e: e.name)
def test_hugging_face_static_cache_step_is_rewritten(entry):
    """transformers' own export wrapper (StaticCache tensors as buffers) goes through the rewrite."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model = entry.build()
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 40}
    step = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=40)
    prompt = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(prompt.shape[1]):  # prefill one token at a time (the wrapper's decode shape)
            step(input_ids=prompt[:, i:i + 1], cache_position=torch.tensor([i]))
    eager = copy.deepcopy(step)
    args = (prompt[:, -1:], None, torch.tensor([11]))
    result = rewrite(step, args, EntmaxKVConfig(selector="certified", page_size=4))
    assert [s.status for s in result.report.sites] == ["rewritten"] * entry.layers
    loaded = result.module()
    with torch.no_grad():
        token = prompt[:, -1:]
        for i in range(3):
            expected, got = eager(token, None, torch.tensor([11 + i])), loaded(token, None, torch.tensor([11 + i]))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = expected[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_model(dtype, atol):
    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=1), batch=3, dtype=dtype, seed=6)
    with torch.no_grad():
        model(torch.randint(0, 96, (3, 21), generator=torch.Generator().manual_seed(6)), torch.arange(21))
    args = (torch.tensor([[1], [2], [3]]), torch.tensor([21]))
    eager = copy.deepcopy(model)
    result = rewrite(model, args, EntmaxKVConfig(selector="certified", page_size=8))
    kmin = next(v for k, v in result.program.state_dict.items() if k.endswith(".kmin"))
    assert kmin.dtype == dtype  # min/max statistics keep the cache's dtype
    for e, g in zip(greedy_steps(eager, args, 3), greedy_steps(result.module(), args, 3)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=0, atol=atol)
