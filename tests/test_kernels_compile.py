"""Every Triton kernel variant a decode step launches compiles for a Hopper GPU, checked on the CPU.

The interpreter runs a kernel as Python, so it accepts programs that Triton's compiler refuses:
a loop variable whose type changes between iterations, a constexpr used as a tensor, an
unsupported index. Such a kernel passes every interpreter test and fails on the first GPU call
(this happened: a peeled first tile reused the loop's variable name). This test records the
launches of decode steps that cover the selectors, the sketch, ALiBi, the soft-cap, a left-padded
batch, a block table, the integer and general alpha paths and fp16/bf16/fp32, then compiles each
distinct variant down to a cubin for sm_90 in a fresh process without the interpreter (Triton
ships its own ptxas; no GPU is needed). The variants carry the interpreter's launch sizes, not the
tuned GPU ones: what this catches does not depend on block sizes.
"""

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_DEVICE

import entmaxkv_compile
from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.runtime import kernels
from entmaxkv_compile.runtime.paged import pool_from_cache
from entmaxkv_compile.runtime.sketch.reference import KeySketch
from entmaxkv_compile.runtime.stats.paged import PagedKVStats
from entmaxkv_compile.runtime.stats.reference import KVPageStats
from entmaxkv_compile.runtime.step import run_step

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="records interpreter launches; a GPU compiles them itself"),
]

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
                  torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8",
                  torch.int16: "*i16", torch.bool: "*i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _variant(fn, args, kwargs) -> dict:
    """The compile-time identity of one launch: argument types, constexpr values (including
    integers equal to 1, which a GPU launch specializes as constants) and launch options."""
    signature, constexprs = {}, {}
    params = list(inspect.signature(fn).parameters.values())
    for i, param in enumerate(params):
        value = args[i] if i < len(args) else kwargs.get(param.name, param.default)
        if "constexpr" in str(param.annotation) or value is None or (type(value) is int and value == 1):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name} of type {type(value).__name__} is not mapped")
    options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def _record(monkeypatch, steps) -> list[dict]:
    """The distinct kernel variants the interpreter launches while ``steps`` run."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, dict] = {}
    launch = InterpretedFunction.run

    def recording(self, *args, **kwargs):
        variant = _variant(self.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        seen.setdefault(json.dumps(variant, sort_keys=True, default=str), variant)
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    for step in steps:
        step()
    return list(seen.values())


PAGE = 16


def _case(dtype, batch=2, hq=8, hkv=2, n=70, dim=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, length, dim, generator=gen).to(dtype)
               for h, length in ((hq, 1), (hkv, n), (hkv, n)))
    seqlens = torch.tensor([n, n - 29][:batch], dtype=torch.int32)
    return q, k, v, seqlens


def _stats(k, seqlens, moment_dtype=None):
    """Page statistics prefilled by the kernel, then one token appended by the kernel."""
    batch, hkv, nmax, dim = k.shape
    stats = KVPageStats.allocate(batch, hkv, nmax, dim, PAGE, k.dtype, "cpu", moment_dtype=moment_dtype)
    kernels.stats_prefill_(k, seqlens - 1, PAGE, *stats.buffers())
    kernels.stats_append_(k, (seqlens - 1).to(torch.int64), PAGE, *stats.buffers())
    return stats.buffers()


def _steps() -> list:
    """Decode steps whose launches cover the kernels' constexpr branches."""
    def step(q, k, v, seqlens, config, stats=None, alpha=1.5, **kwargs):
        moments = k.dtype if config.moment_dtype == "cache" else None
        stats = _stats(k, seqlens, moments) if stats is None else stats
        return lambda: run_step(kernels, q, k, v, seqlens, stats, config, alpha=alpha,
                                scale=1 / math.sqrt(q.shape[-1]), **kwargs)

    q, k, v, seqlens = _case(torch.float16)
    # alpha sets the decode's constexprs (every selector runs the decode) and the keep kernel's
    # beta (gaussian); the rest of the variants need one alpha (the interpreter is the slow part)
    steps = [step(q, k, v, seqlens, EntmaxKVConfig(selector="dense"), alpha=alpha) for alpha in (1.5, 2.0, 1.25, 1.75)]
    steps += [step(q, k, v, seqlens, EntmaxKVConfig(selector="gaussian"), alpha=alpha) for alpha in (2.0, 1.25)]
    steps += [step(q, k, v, seqlens, EntmaxKVConfig(selector=selector, report_bound=True))
              for selector in ("topk", "gaussian", "certified")]
    steps.append(step(q, k, v, seqlens, EntmaxKVConfig(selector="gaussian", moment_dtype="cache")))
    sketch = KeySketch.from_cache(k, seqlens).buffers()
    steps.append(step(q, k, v, seqlens, EntmaxKVConfig(selector="certified", certify_sketch="int8"), sketch=sketch))
    slopes = torch.rand(q.shape[1]) * 0.1
    for selector in ("gaussian", "certified"):
        steps.append(step(q, k, v, seqlens, EntmaxKVConfig(selector=selector), alibi_slopes=slopes))
        steps.append(step(q, k, v, seqlens, EntmaxKVConfig(selector=selector), softcap=5.0))
        steps.append(step(q, k, v, seqlens, EntmaxKVConfig(selector=selector),
                          row_start=torch.tensor([20, 3], dtype=torch.int32)))
    for dtype in (torch.bfloat16, torch.float32):
        qd, kd, vd, sd = _case(dtype, seed=1)
        steps.append(step(qd, kd, vd, sd, EntmaxKVConfig(selector="gaussian")))
    batch, hkv, _, dim = k.shape
    k_pool, table = pool_from_cache(k, PAGE)
    v_pool, _ = pool_from_cache(v, PAGE)
    paged = PagedKVStats.allocate(k_pool.shape[0], hkv, dim, batch=batch, max_pages=table.shape[1], page_size=PAGE,
                                  dtype=k.dtype, device="cpu")
    kernels.stats_prefill_(k_pool, seqlens, PAGE, *paged.buffers(), table)
    for selector in ("gaussian", "certified", "dense"):
        steps.append(step(q, k_pool, v_pool, seqlens, EntmaxKVConfig(selector=selector), stats=paged.buffers(),
                          block_table=table))
    return steps


_COMPILE = r"""
import importlib, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failures = []
for variant in json.load(sys.stdin):
    fn = getattr(importlib.import_module(variant["module"]), variant["name"])
    try:
        triton.compile(ASTSource(fn=fn, signature=variant["signature"], constexprs=variant["constexprs"]),
                       target=GPUTarget("cuda", 90, 32), options=variant["options"])
    except Exception as err:
        failures.append(f"{variant['module']}.{variant['name']} {variant['constexprs']}: "
                        + "".join(traceback.format_exception_only(err))[-1500:])
print(json.dumps(failures))
"""


def test_every_launched_kernel_compiles_for_sm90(monkeypatch):
    variants = _record(monkeypatch, _steps())
    names = {v["name"] for v in variants}
    assert {"score_kernel", "tau_first_kernel", "tau_second_kernel", "output_kernel", "reduce_kernel",
            "moments_kernel", "keep_kernel", "compact_kernel", "quest_kernel", "blocks_kernel"} <= names, names
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    # the same package the recording imported, whatever the environment would pick
    root = str(Path(entmaxkv_compile.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    done = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(variants, default=str),
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(failures)
