"""ONNX export of rewritten decode steps: explicit state, custom domain, standard-op decomposition."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.export.explicit_state import explicit_state_module
from entmaxkv_compile.export.functional_ops import to_plugin_form
from entmaxkv_compile.export.onnx import _bool_where_to_logic, _standard_op_forms, export_onnx
from entmaxkv_compile.export.onnx_schemas import DOMAIN, SCHEMAS, register_schemas
from entmaxkv_compile.export.references import bool_cumprod, ndtri_rational, prod_over_dims
from entmaxkv_compile.compiler.rewrite import rewrite
from examples.zoo import ZOO


@pytest.fixture(scope="module")
def alibi_topk_step(zoo_step):
    model, args = zoo_step(alibi="half", rope=False, seed=2)
    return rewrite(model, args, EntmaxKVConfig(selector="topk", page_size=8, token_budget=16))


def test_decomposed_model_runs_in_onnxruntime_and_carries_state(alibi_topk_step, tmp_path):
    result = alibi_topk_step
    exported = export_onnx(result, tmp_path / "step.onnx", decompose=True)
    assert exported.custom_nodes == ()
    model = onnx.load(str(exported.path))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    state = exported.explicit.state
    assert any(name.endswith("k_cache") for name in state) and any(name.endswith("km2") for name in state)
    assert exported.input_names == (*(_ecosystem_name(s, "past") for s in state), "idx", "input_pos")
    assert [i.name for i in model.graph.input] == list(exported.input_names)
    assert exported.output_names[: len(state)] == tuple(_ecosystem_name(s, "present") for s in state)
    assert "past_key_values.1.value" in exported.input_names and "present_page_stats.1.km2" in exported.output_names

    # step 1, then feed present back as past for step 2: onnxruntime == PyTorch on every output
    token, position = result.example_args
    ort_1 = exported.run_onnxruntime((token, position))
    torch_1 = exported.run_torch((token, position))
    for a, b in zip(ort_1, torch_1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    next_token = torch.from_numpy(ort_1[-1][:, -1].argmax(-1, keepdims=True))
    new_state = [torch.from_numpy(a) for a in ort_1[: len(state)]]
    ort_2 = exported.run_onnxruntime((next_token, position + 1), state=new_state)
    torch_2 = exported.run_torch((next_token, position + 1), state=new_state)
    for a, b in zip(ort_2, torch_2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # the functional module the ONNX graph came from is the rewritten program itself
    program = result.module()
    with torch.no_grad():
        logits_1 = program(token, position)
        logits_2 = program(next_token, position + 1)
    np.testing.assert_allclose(ort_1[-1], logits_1.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ort_2[-1], logits_2.numpy(), rtol=1e-4, atol=1e-4)


def _ecosystem_name(fqn, side):
    """The name the zoo model's state ``fqn`` must get (optimum / onnxruntime-genai for the caches)."""
    cache = re.fullmatch(r"layers\.(\d+)\.attention\.kv_cache\.(k|v)_cache", fqn)
    if cache:
        layer, kind = cache.group(1), {"k": "key", "v": "value"}[cache.group(2)]
        return f"{'past_key_values' if side == 'past' else 'present'}.{layer}.{kind}"
    stats = re.fullmatch(r"entmaxkv\.layers_(\d+)_attention_kv_cache_k_cache\.(kmin|kmax|kmean|km2)", fqn)
    assert stats, f"unexpected state {fqn}"
    return f"{side}_page_stats.{stats.group(1)}.{stats.group(2)}"


ZOO_DECODE = [e for e in ZOO.values() if e.family == "gpt_fast" and e.decode_status == "rewritten"]


@pytest.mark.parametrize("entry", ZOO_DECODE, ids=lambda e: e.name)
def test_every_zoo_decode_step_runs_in_onnxruntime(entry, tmp_path):
    model = entry.build()
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, model.args.vocab_size, (2, 19), generator=generator)
    with torch.no_grad():
        model(prompt, torch.arange(19))
    args = (torch.randint(0, model.args.vocab_size, (2, 1), generator=generator), torch.tensor([19]))
    result = rewrite(model, args, EntmaxKVConfig(selector="dense", page_size=8))
    exported = export_onnx(result, tmp_path / "step.onnx")
    assert exported.max_abs_error(args) < 1e-4
    with torch.no_grad():
        expected = result.module()(*args)
    np.testing.assert_allclose(exported.run_onnxruntime(args)[-1], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_rolling_buffer_plugin_form_is_refused_by_name(tmp_path):
    """The page rebuild of a rolling buffer has no plugin form (custom domain, TensorRT): the export
    says so and names the exports that take it, instead of failing inside the ONNX translation."""
    model = ZOO["rolling_buffer"].build()
    prompt = torch.randint(0, model.args.vocab_size, (2, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model(prompt, torch.arange(19))
    result = rewrite(model, (prompt[:, -1:], torch.tensor([19])), EntmaxKVConfig(selector="dense", page_size=8))
    with pytest.raises(ValueError, match="page_stats_rebuild keeps a rolling-buffer cache's statistics.*AOTInductor"):
        export_onnx(result, tmp_path / "step.onnx", decompose=False)


def test_custom_domain_nodes_carry_the_plugin_lookup(alibi_topk_step, tmp_path):
    exported = export_onnx(alibi_topk_step, tmp_path / "custom.onnx", decompose=False)
    assert exported.custom_nodes == ("page_stats_append_functional", "decode_step_plugin") * 2
    model = onnx.load(str(exported.path))
    assert any(o.domain == DOMAIN and o.version == 1 for o in model.opset_import)
    decode = next(n for n in model.graph.node if n.op_type == "decode_step_plugin")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in decode.attribute}
    assert attributes["plugin_namespace"] == b"entmaxkv"
    assert attributes["selector"] == b"topk" and attributes["page_size"] == 8
    assert attributes["tau_estimate"] == b"mixture"  # "auto" resolved: the model has ALiBi
    assert attributes["token_budget"] == 16
    assert len(decode.input) == 9 and len(decode.output) == 5
    with pytest.raises(RuntimeError, match="cannot run"):
        exported.run_onnxruntime(alibi_topk_step.example_args)


def test_schemas_are_registered_once_and_validate_nodes():
    register_schemas()
    register_schemas()
    for spec in SCHEMAS:
        schema = onnx.defs.get_schema(spec.name, 1, DOMAIN)
        assert [p.name for p in schema.inputs] == [n for n, _ in spec.inputs]
        assert {"plugin_namespace", "plugin_version"} <= set(schema.attributes)
    bad = onnx.helper.make_node("page_stats_append_functional", ["k"], ["a", "b", "c", "d"], domain=DOMAIN)
    graph = onnx.helper.make_graph([bad], "g", [onnx.helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                    for n in "abcd"])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20),
                                                         onnx.helper.make_opsetid(DOMAIN, 1)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)


def test_bool_cumprod_becomes_cumsum():
    x = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    assert torch.equal(bool_cumprod(x, -1), x.cumprod(-1))
    assert torch.equal(bool_cumprod(x, 0, torch.float32), x.cumprod(0, dtype=torch.float32))
    program = torch.export.export(_Wrap(lambda a, b: (a.cumprod(-1), b.cumprod(-1))), (x, x.float()))
    graph_module = program.run_decompositions().graph_module
    assert _standard_op_forms(graph_module) == 1  # the float cumprod stays
    bools, floats = graph_module(x, x.float())
    assert torch.equal(bools, x.cumprod(-1)) and torch.equal(floats, x.float().cumprod(-1))


def test_prims_prod_becomes_aten_prod():
    x = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    assert torch.equal(prod_over_dims(x, [1, 2]), x.prod(2).prod(1))
    assert torch.equal(prod_over_dims(x, None), x.prod(2).prod(1).prod(0))
    assert prod_over_dims(x, [0], torch.float64).dtype == torch.float64
    program = torch.export.export(_Wrap(lambda a: torch.ops.prims.prod.default(a, [1])), (x,))
    graph_module = program.graph_module
    assert _standard_op_forms(graph_module) == 1
    torch.testing.assert_close(graph_module(x)[0], x.prod(1))
    traced = torch.export.export(graph_module, (x,)).run_decompositions()
    assert {str(n.target) for n in traced.graph.nodes if n.op == "call_function"} == {"aten.prod.dim_int"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ndtri_rational_matches_torch(dtype):
    generator = torch.Generator().manual_seed(0)
    p = torch.cat([torch.rand(20001, generator=generator, dtype=dtype),
                   torch.logspace(-30, -1, 301, dtype=dtype), 1 - torch.logspace(-6, -1, 51, dtype=dtype)])
    expected = torch.special.ndtri(p)
    rel, absolute = (2e-9, 1e-12) if dtype == torch.float64 else (2e-6, 1e-6)
    assert ((ndtri_rational(p) - expected).abs() <= rel * expected.abs() + absolute).all()
    edges = torch.tensor([0.0, 1.0, -0.5, 1.5, float("nan")], dtype=dtype)
    torch.testing.assert_close(ndtri_rational(edges), torch.special.ndtri(edges), equal_nan=True)


def test_bool_where_becomes_logic():
    def f(c, a, b):
        return torch.where(c, a, b), torch.where(c, True, b), torch.where(c, a, False), torch.where(c, a.float(), 2.0)

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(3, 5, generator=generator) > 0.5 for _ in range(3)]
    program = torch.export.export(_Wrap(f), tuple(inputs)).run_decompositions()
    module = program.module()
    expected = module(*inputs)
    graph_module = program.graph_module
    assert _bool_where_to_logic(graph_module) == 3  # the float where stays
    for got, want in zip(graph_module(*inputs), expected):
        assert torch.equal(got, want)


def test_float64_erf_becomes_standard_ops():
    x = torch.cat([torch.linspace(-6, 6, 1201, dtype=torch.float64), torch.tensor([-30.0, 30.0], dtype=torch.float64)])
    program = torch.export.export(_Wrap(lambda a, b, c: (torch.erf(a), torch.erfc(b), torch.erf(c))),
                                  (x, x, x.float())).run_decompositions()
    graph_module = program.graph_module
    assert _standard_op_forms(graph_module) == 2  # the float32 erf stays
    erf, erfc, narrow = graph_module(x, x, x.float())
    assert erf.dtype == erfc.dtype == torch.float64
    torch.testing.assert_close(erf, torch.erf(x), rtol=0, atol=2e-7)
    assert ((erfc - torch.erfc(x)).abs() <= 1.2e-7 * torch.erfc(x)).all()  # relative, tails included
    assert torch.equal(narrow, torch.erf(x.float()))
    targets = {str(n.target) for n in torch.export.export(graph_module, (x, x, x.float())).graph.nodes}
    assert not any("erfc" in t for t in targets)


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class _Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("offset", torch.ones(3))
        self.weight = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        self.count.add_(1)
        return x * self.weight + self.offset + self.count


def test_explicit_state_module_moves_mutated_buffers_to_inputs_and_outputs():
    module = _Counter()
    x = torch.randn(3)
    program = torch.export.export(module, (x,)).run_decompositions()
    explicit = explicit_state_module(program)
    assert explicit.state == ("count",)
    assert explicit.input_names == ("past.count", "x")
    assert explicit.output_names == ("present.count", "output_0")
    new_count, out = explicit.module(torch.tensor(4), x)
    assert int(new_count) == 5
    torch.testing.assert_close(out, x * module.weight + 1 + 5)
    assert explicit_state_module(program, ["tokens"]).input_names == ("past.count", "tokens")
    with pytest.raises(ValueError, match="must name the 1 user inputs"):
        explicit_state_module(program, ["a", "b"])


class _Optional(torch.nn.Module):
    def forward(self, x, bias=None, scale=None):
        return x * scale if bias is None else x + bias


def test_explicit_state_skips_none_arguments():
    x, scale = torch.randn(4), torch.randn(4)
    program = torch.export.export(_Optional(), (x, None, scale)).run_decompositions()
    explicit = explicit_state_module(program)
    assert explicit.state == () and explicit.input_names == ("x", "scale")
    (out,) = explicit.module(x, scale)
    torch.testing.assert_close(out, x * scale)


def test_explicit_state_needs_a_functional_program():
    program = torch.export.export(_Counter(), (torch.randn(3),))  # training IR: add_ still in place
    with pytest.raises(ValueError, match="run_decompositions"):
        explicit_state_module(program)


def test_plugin_form_equals_the_original_ops(zoo_step):
    model, args = zoo_step(context=11, n_layer=1, seed=5)
    result = rewrite(model, args, EntmaxKVConfig(selector="gaussian", page_size=4))
    reference = copy.deepcopy(result.program.module())
    converted = copy.deepcopy(result.program.module())
    assert to_plugin_form(converted) == 2  # one stats append, one decode step
    targets = {n.target for n in converted.graph.nodes if n.op == "call_function"}
    assert torch.ops.entmaxkv.decode_step_plugin.default in targets
    assert torch.ops.entmaxkv.decode_step.default not in targets
    assert torch.ops.entmaxkv.page_stats_append.default not in targets
    with torch.no_grad():
        torch.testing.assert_close(converted(*args), reference(*args), rtol=0, atol=0)
    stats = [name for name, _ in reference.named_buffers() if name.startswith("entmaxkv.")]
    assert len(stats) == 4
    for name in stats:  # the functional update + copy_ wrote the same statistics in place
        torch.testing.assert_close(converted.get_buffer(name), reference.get_buffer(name), rtol=0, atol=0)


def _decode_operands(batch=2, q_heads=6, kv_heads=2, max_seqlen=21, head_dim=8, page_size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(batch, kv_heads, max_seqlen, head_dim, generator=generator)
    v_cache = torch.randn(batch, kv_heads, max_seqlen, head_dim, generator=generator)
    seqlens = torch.tensor([max_seqlen, 13])[:batch]  # ragged, the second one ends inside a page
    stats = KVPageStats.from_cache(k_cache, seqlens, page_size)
    q = torch.randn(batch, q_heads, 1, head_dim, generator=generator)
    return q, k_cache, v_cache, seqlens, stats


@pytest.mark.parametrize("alibi", [False, True])
def test_decode_step_plugin_equals_decode_step(alibi):
    q, k_cache, v_cache, seqlens, stats = _decode_operands(seed=int(alibi))
    slopes = torch.linspace(0.05, 0.4, q.shape[1]) if alibi else None
    scalars = (0.35, 1.5, 4, "gaussian", 8, 0.9, 0.0)
    tail = (0, 1, 2, 0)
    expected = torch.ops.entmaxkv.decode_step(q, k_cache, v_cache, seqlens, *stats.buffers(), slopes, *scalars,
                                              "auto", *tail)
    resolved = "mixture" if alibi else "global"
    zeros = torch.zeros(q.shape[1]) if slopes is None else slopes
    got = torch.ops.entmaxkv.decode_step_plugin(q, k_cache, v_cache, seqlens, *stats.buffers(), zeros, *scalars,
                                                resolved, *tail)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_export_forms_pass_opcheck():
    q, k_cache, v_cache, seqlens, stats = _decode_operands(batch=1, max_seqlen=10)
    positions = torch.tensor([9])
    append = torch.ops.entmaxkv.page_stats_append_functional.default
    prefill = torch.ops.entmaxkv.page_stats_prefill_functional.default
    torch.library.opcheck(append, (k_cache, positions, *stats.buffers(), 4))
    torch.library.opcheck(prefill, (k_cache, seqlens, *stats.buffers(), 4))
    torch.library.opcheck(torch.ops.entmaxkv.decode_step_plugin.default,
                          (q, k_cache, v_cache, seqlens, *stats.buffers(), torch.zeros(q.shape[1]), 0.35, 2.0, 4,
                           "topk", 8, 0.99, 0.0, "global", 0, 0, 4, 0))
    # the functional update equals the in-place op and leaves its inputs alone
    before = [t.clone() for t in stats.buffers()]
    new = append(k_cache, positions, *stats.buffers(), 4)
    for old, unchanged in zip(before, stats.buffers()):
        assert torch.equal(old, unchanged)
    torch.ops.entmaxkv.page_stats_append(k_cache, positions, 4, *stats.buffers())
    for functional, in_place in zip(new, stats.buffers()):
        assert torch.equal(functional, in_place)


def test_hugging_face_static_cache_step_runs_in_onnxruntime(tmp_path):
    """A transformers Llama (entmax15 through AttentionInterface, StaticCache, None arguments)."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model = ZOO["hf_llama"].build()
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 24}
    step = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=24)
    prompt = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in range(prompt.shape[1]):
            step(input_ids=prompt[:, i:i + 1], cache_position=torch.tensor([i]))
    args = (prompt[:, -1:], None, torch.tensor([9]))  # inputs_embeds=None is not an ONNX input
    result = rewrite(step, args, EntmaxKVConfig(selector="topk", page_size=4, token_budget=8))
    exported = export_onnx(result, tmp_path / "llama.onnx")
    assert exported.input_names[-2:] == ("input_ids", "cache_position")
    assert any("cumulative_length" in name for name in exported.explicit.state)  # the 5.x counter is state
    assert exported.max_abs_error(args) < 1e-4
    with torch.no_grad():
        expected = result.module()(*args)
    np.testing.assert_allclose(exported.run_onnxruntime(args)[-1], expected.numpy(), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def standalone_step(zoo_step, tmp_path_factory):
    """A 1-layer top-k step exported to ONNX (with its statistics graph) and the PyTorch step."""
    model, args = zoo_step(context=13, batch=2, n_layer=1, seed=4)
    result = rewrite(model, args, EntmaxKVConfig(selector="topk", page_size=4, token_budget=8))
    exported = export_onnx(result, tmp_path_factory.mktemp("standalone") / "step.onnx")
    return result, exported


def _session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_standalone_onnx_runs_from_the_prompt_through_16_decode_steps(standalone_step):
    """Only onnxruntime and the model files: an empty state (zeros), the prompt one token at a time,
    then 16 greedy decode steps; every step's logits match the rewritten PyTorch step (1e-4)."""
    result, exported = standalone_step
    session = _session(exported.path)
    assert [i.name for i in session.get_inputs()] == list(exported.input_names)
    state_names = [name for name in exported.input_names if name not in ("idx", "input_pos")]
    state = {i.name: np.zeros(i.shape, dtype={"tensor(float)": np.float32, "tensor(double)": np.float64}[i.type])
             for i in session.get_inputs() if i.name in state_names}
    step = copy.deepcopy(result.module())  # PyTorch: the same step from the same empty state
    for fqn in exported.explicit.state:
        step.get_buffer(fqn).zero_()
    prompt = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(11))
    tokens = [prompt[:, i:i + 1] for i in range(prompt.shape[1])]
    for position in range(prompt.shape[1] + 16):
        token = tokens[position]
        outputs = dict(zip(exported.output_names, session.run(None, {
            **state, "idx": token.numpy(), "input_pos": np.array([position], dtype=np.int64)})))
        with torch.no_grad():
            expected = step(token, torch.tensor([position]))
        np.testing.assert_allclose(outputs["output_0"], expected.numpy(), rtol=1e-4, atol=1e-4)
        state = {name: outputs[name.replace("past_key_values.", "present.").replace("past_page_stats.",
                                                                                   "present_page_stats.")]
                 for name in state_names}
        if position >= prompt.shape[1] - 1:
            tokens.append(torch.from_numpy(outputs["output_0"][:, -1].argmax(-1, keepdims=True)))
    assert len(tokens) == prompt.shape[1] + 17
    for fqn, name in zip(exported.explicit.state, state_names):  # the carried state is PyTorch's
        np.testing.assert_allclose(state[name], step.get_buffer(fqn).numpy(), rtol=1e-5, atol=1e-5)


def test_statistics_graph_initialises_the_step_from_a_filled_cache(standalone_step):
    """The statistics graph gives the step's statistics of the cache it was exported with (filled
    by the model's prefill), and the step fed with them matches the rewritten PyTorch step."""
    result, exported = standalone_step
    assert exported.stats_path is not None and exported.stats_path.name == "step.stats.onnx"
    session = _session(exported.stats_path)
    initial = dict(zip(exported.input_names, exported.explicit.state_values))
    assert [i.name for i in session.get_inputs()] == ["seqlens", "past_key_values.0.key"]
    cache = initial["past_key_values.0.key"].numpy()
    stats = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
        "seqlens": np.array([13, 13], dtype=np.int64), "past_key_values.0.key": cache})))
    assert sorted(stats) == sorted(f"past_page_stats.0.{f}" for f in ("kmin", "kmax", "kmean", "km2"))
    for name, value in stats.items():
        np.testing.assert_allclose(value, initial[name].numpy(), rtol=1e-6, atol=1e-6)
    feed = {name: value.numpy() for name, value in initial.items() if name not in stats} | stats
    step = _session(exported.path)
    token, position = result.example_args
    outputs = step.run(None, {**feed, "idx": token.numpy(), "input_pos": position.numpy()})
    with torch.no_grad():
        expected = copy.deepcopy(result.module())(token, position)
    np.testing.assert_allclose(outputs[-1], expected.numpy(), rtol=1e-4, atol=1e-4)
    # an empty cache has all-zero statistics: the zeros of the first test are the right start
    empty = session.run(None, {"seqlens": np.array([0, 0], dtype=np.int64),
                               "past_key_values.0.key": initial["past_key_values.0.key"].numpy()})
    assert all(not np.any(value) for value in empty)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def test_export_docs_commands_parse():
    """Every entmaxkv-compile command in docs/export.md is accepted by the command line as written."""
    from entmaxkv_compile.cli import build_parser

    text = DOCS.read_text()
    commands = [shlex.split(line)[1:] for line in re.findall(r"^entmaxkv-compile .*$", text, re.M)]
    assert {"onnx", "aoti", "tensorrt"} <= {c[c.index("--format") + 1] for c in commands if "--format" in c}
    for command in commands:
        build_parser().parse_args(command)  # exits (SystemExit) on an unknown flag or value


def test_export_docs_onnxruntime_snippet_runs_as_written(standalone_step, monkeypatch, capsys):
    """The plain-onnxruntime block of docs/export.md, run on a step of the same interface (batch 2)."""
    _, exported = standalone_step
    block = next(b for b in re.findall(r"^```python\n(.*?)^```", DOCS.read_text(), re.M | re.S)
                 if "import onnxruntime" in b)
    monkeypatch.chdir(exported.path.parent)
    exec(compile(block, "docs/export.md onnxruntime block", "exec"), {"__name__": "__docs__"})
    tokens = eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert tokens[:4] == [5, 17, 3, 42] and len(tokens) == 4 + 9
