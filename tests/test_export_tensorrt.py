"""The TensorRT path without TensorRT: plugin descriptors, shape functions, registration, errors.

Building an engine needs TensorRT's libraries and a CUDA GPU, which CI machines do not have (the
PyPI ``tensorrt`` package only downloads them from NVIDIA's index). What is tested here is every
piece that does not: the plugins' shape/dtype functions against the ops' fake implementations,
registration against stand-ins that enforce TensorRT's quick-deploy-plugin rules, and the error
message when TensorRT is absent. The engine build itself is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import inspect
import typing

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from entmaxkv_compile.export import tensorrt as trt_export
from entmaxkv_compile.export.tensorrt import PLUGINS, TensorRTUnavailableError, export_tensorrt, register_plugins

HAS_TENSORRT = all(importlib.util.find_spec(name) is not None for name in ("torch_tensorrt", "tensorrt"))


def _decode_inputs(batch, q_heads, kv_heads, max_seqlen, head_dim, page_size, dtype):
    num_pages = -(-max_seqlen // page_size)
    stats = (batch, kv_heads, num_pages, head_dim)
    return {
        "q": torch.empty(batch, q_heads, 1, head_dim, dtype=dtype),
        "k_cache": torch.empty(batch, kv_heads, max_seqlen, head_dim, dtype=dtype),
        "v_cache": torch.empty(batch, kv_heads, max_seqlen, head_dim, dtype=dtype),
        "seqlens": torch.empty(batch, dtype=torch.int64),
        "kmin": torch.empty(stats, dtype=dtype), "kmax": torch.empty(stats, dtype=dtype),
        "kmean": torch.empty(stats), "km2": torch.empty(stats),
        "alibi_slopes": torch.empty(q_heads),
    }


_ATTRIBUTES = {"scale": 0.125, "alpha": 1.5, "page_size": 8, "selector": "gaussian", "token_budget": 64,
               "max_quantile": 0.99, "margin": 0.0, "tau_estimate": "global", "sink_pages": 0,
               "recent_pages": 0, "certify_max_rounds": 2, "min_context": 0, "softcap": 0.0}

# (batch, q heads, kv heads, max_seqlen, head_dim, page_size, dtype)
SHAPES = [(1, 4, 4, 40, 16, 8, torch.float32), (3, 8, 2, 37, 8, 4, torch.float16),
          (2, 6, 1, 65, 32, 16, torch.bfloat16)]


def _check_against_fake(spec, op, inputs, attributes):
    with FakeTensorMode() as mode:
        fakes = {name: mode.from_tensor(t) for name, t in inputs.items()}
        results = op(*(fakes[n] for n in spec.tensor_inputs), *(attributes[n] for n, _ in spec.attributes))
    shapes = spec.output_shapes({n: tuple(t.shape) for n, t in inputs.items()})
    dtypes = spec.output_dtypes({n: t.dtype for n, t in inputs.items()}, lambda name: getattr(torch, name))
    assert len(results) == len(spec.outputs)
    for result, shape, dtype in zip(results, shapes, dtypes):
        assert tuple(result.shape) == shape
        assert result.dtype == dtype


@pytest.mark.parametrize("shape", SHAPES, ids=["mha-fp32", "gqa4-fp16-odd", "mqa-bf16-partial-page"])
def test_decode_plugin_shapes_and_dtypes_match_the_op(shape):
    spec = next(p for p in PLUGINS if p.name == "decode_step_plugin")
    *dims, page_size, dtype = shape
    inputs = _decode_inputs(*dims, page_size, dtype)
    attributes = {**_ATTRIBUTES, "page_size": page_size}
    _check_against_fake(spec, torch.ops.entmaxkv.decode_step_plugin.default, inputs, attributes)


@pytest.mark.parametrize("name, index", [("page_stats_append_functional", "positions"),
                                         ("page_stats_prefill_functional", "seqlens")])
@pytest.mark.parametrize("shape", SHAPES, ids=["mha-fp32", "gqa4-fp16-odd", "mqa-bf16-partial-page"])
def test_stats_plugin_shapes_and_dtypes_match_the_op(name, index, shape):
    spec = next(p for p in PLUGINS if p.name == name)
    *dims, page_size, dtype = shape
    decode = _decode_inputs(*dims, page_size, dtype)
    inputs = {"k_cache": decode["k_cache"], index: decode["seqlens"],
              **{k: decode[k] for k in ("kmin", "kmax", "kmean", "km2")}}
    _check_against_fake(spec, getattr(torch.ops.entmaxkv, name).default, inputs, {"page_size": page_size})


def test_plugins_follow_the_op_schemas():
    for spec in PLUGINS:
        schema = getattr(torch.ops.entmaxkv, spec.name).default._schema
        arguments = [a.name for a in schema.arguments]
        assert arguments == [*spec.tensor_inputs, *(n for n, _ in spec.attributes)], spec.name
        assert len(schema.returns) == len(spec.outputs)
        assert not any(a.type.kind() == "OptionalType" for a in schema.arguments)  # TensorRT needs all inputs


def test_missing_input_shape_is_named():
    spec = PLUGINS[0]
    with pytest.raises(ValueError, match="missing input shapes"):
        spec.output_shapes({"q": (1, 2, 1, 4)})


class _FakeQDP:
    """Stand-in for ``tensorrt.plugin``: enforces the quick-deploy plugin signature rules."""

    class TensorDesc:
        pass

    class Tensor:
        pass

    def __init__(self):
        self.registered: dict[str, inspect.Signature] = {}
        self.impls: dict[str, inspect.Signature] = {}

    def register(self, plugin_id):
        def decorate(fn):
            namespace, name = plugin_id.split("::")
            assert namespace == "entmaxkv" and "." not in name
            sig = inspect.signature(fn)
            seen_attribute = False
            for parameter in sig.parameters.values():
                assert parameter.annotation is not inspect.Parameter.empty, parameter.name
                assert parameter.default is inspect.Parameter.empty, parameter.name
                if parameter.annotation is self.TensorDesc:
                    assert not seen_attribute, "tensors must come before attributes"
                else:
                    assert parameter.annotation in (int, float, bool, str, bytes), parameter
                    assert parameter.name not in ("outputs", "stream", "tactic")
                    seen_attribute = True
            assert typing.get_origin(sig.return_annotation) is tuple
            assert all(a is self.TensorDesc for a in typing.get_args(sig.return_annotation))
            self.registered[plugin_id] = sig
            return fn
        return decorate

    def impl(self, plugin_id):
        def decorate(fn):
            described = self.registered[plugin_id]
            sig = inspect.signature(fn)
            assert list(sig.parameters) == [*described.parameters, "outputs", "stream"]
            outputs = sig.parameters["outputs"].annotation
            assert len(typing.get_args(outputs)) == len(typing.get_args(described.return_annotation))
            self.impls[plugin_id] = sig
            return fn
        return decorate


class _FakeConverters:
    def __init__(self):
        self.calls = []

    def generate_plugin_converter(self, plugin_id, **kwargs):
        self.calls.append((plugin_id, kwargs))


def test_register_plugins_against_stand_ins(monkeypatch):
    monkeypatch.setattr(trt_export, "_REGISTERED", set())
    qdp, converters = _FakeQDP(), _FakeConverters()
    done = register_plugins(trt=object(), trtp=qdp, converters=converters)
    ids = tuple(p.plugin_id for p in PLUGINS)
    assert done == ids
    assert tuple(qdp.registered) == ids and tuple(qdp.impls) == ids
    assert [c[0] for c in converters.calls] == list(ids)
    assert all(c[1]["supports_dynamic_shapes"] for c in converters.calls)
    assert register_plugins(trt=object(), trtp=qdp, converters=converters) == ()  # idempotent
    assert len(converters.calls) == len(ids)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT message cannot be observed")
def test_export_without_tensorrt_says_what_to_install(tmp_path):
    with pytest.raises(TensorRTUnavailableError) as info:
        export_tensorrt(None, tmp_path / "step.ep")
    message = str(info.value)
    assert "torch-tensorrt" in message and "pypi.nvidia.com" in message and "--format onnx" in message


@pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                    reason="building a TensorRT engine needs torch-tensorrt, TensorRT >= 10.7 and a CUDA GPU")
def test_tensorrt_engine_matches_pytorch(tmp_path):
    from entmaxkv_compile import EntmaxKVConfig
    from entmaxkv_compile.compiler.rewrite import rewrite
    from examples.zoo import gpt_fast

    model = gpt_fast.build(gpt_fast.ModelArgs(), batch=1, device="cuda")
    with torch.no_grad():
        model(torch.zeros(1, 9, dtype=torch.long, device="cuda"), torch.arange(9, device="cuda"))
    args = (torch.ones(1, 1, dtype=torch.long, device="cuda"), torch.tensor([9], device="cuda"))
    result = rewrite(model, args, EntmaxKVConfig(selector="certified", page_size=8))
    exported = export_tensorrt(result, tmp_path / "step.ep")
    inputs = (*exported.explicit.state_values, *args)
    engine = torch.export.load(str(exported.path)).module()
    with torch.no_grad():
        expected = exported.explicit.module(*(t.clone() for t in inputs))
        got = engine(*(t.clone() for t in inputs))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-3, atol=1e-3)
