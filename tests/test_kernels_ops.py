"""The kernels are registered as ``entmaxkv::triton_*`` ops whose fake (meta) implementations
give output shapes without running, as torch.compile and torch.export need.

The fake path is exercised with compiled (not interpreted) Triton kernels in a subprocess: the
CPU interpreter cannot run under fake tensors, and nothing is launched in fake mode anyway.
"""

import subprocess
import sys
import textwrap

import torch

from entmaxkv_compile.runtime import kernels  # noqa: F401  (registers the entmaxkv::triton_* ops)

OPS = ("triton_paged_decode", "triton_select_pages", "triton_quest_bounds", "triton_certify",
       "triton_stats_prefill_", "triton_stats_append_")


def test_every_launcher_is_a_registered_op():
    for name in OPS:
        assert hasattr(torch.ops.entmaxkv, name), name
    schema = torch.ops.entmaxkv.triton_stats_append_.default._schema
    mutated = {a.name for a in schema.arguments
               if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"kmin", "kmax", "kmean", "km2"}


FAKE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from entmaxkv_compile.runtime import kernels
    B, Hq, Hkv, N, D, P = 2, 8, 2, 64, 16, 16
    with FakeTensorMode():
        q = torch.randn(B, Hq, 1, D)
        k, v = torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
        seqlens = torch.full((B,), N, dtype=torch.int32)
        idx = torch.zeros(B, Hkv, N // P, dtype=torch.int32)
        nsel = torch.ones(B, Hkv, dtype=torch.int32)
        stats = [torch.zeros(B, Hkv, N // P, D) for _ in range(4)]
        kernels.stats_append_(k, seqlens - 1, P, *stats)
        out, tau = kernels.paged_decode(q, k, v, seqlens, idx, nsel, page_size=P, alpha=1.5,
                                        scale=0.25)
        sel = kernels.select_pages(q, *stats, seqlens, page_size=P, alpha=1.5, scale=0.25,
                                   selector="gaussian", token_budget=32, max_quantile=0.99,
                                   margin=0.0, tau_estimate="auto", sink_pages=0,
                                   recent_pages=0, min_context=0)
        cert = kernels.certify(q, stats[0], stats[1], seqlens, idx, nsel, tau, page_size=P,
                               alpha=1.5, scale=0.25)
        print(tuple(out.shape), tuple(tau.shape), tuple(sel[0].shape), tuple(sel[1].shape),
              cert[0].dtype, tuple(cert[1].shape))
""")


def test_fake_tensor_shapes_without_running():
    proc = subprocess.run([sys.executable, "-c", FAKE_SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == \
        "(2, 8, 1, 16) (2, 8) (2, 2, 4) (2, 2) torch.bool (2, 8)"
