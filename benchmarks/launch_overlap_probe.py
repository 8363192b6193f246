"""What programmatic dependent launch (PDL, Hopper and later) saves at a kernel boundary.

Two questions, answered on the device at hand and written to ``launch_overlap_probe.json``:

1. Does it take effect, eagerly and inside a CUDA graph? A kernel that spins 20 us is followed
   by a one-program kernel that reads the global timer before and after its grid-dependency wait;
   with PDL in effect the first reading comes before the spinner's end.
2. What does a boundary cost? A chain of 20 small dependent kernels replayed in a CUDA graph,
   microseconds per kernel with and without PDL.

On the H200 (2026-12-01) it took effect in a graph (the probe started 19.5 us before the spinner
ended) and cut a boundary from 1.00 to 0.78 us: too little to show on the decode step, whose ~1
us per boundary is mostly the dependent kernel's own start (NOTES, version 13).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _dependent(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def spin_kernel(buf, ns, PDL: tl.constexpr):
    _dependent(PDL)
    t0 = _now()
    t = t0
    while t - t0 < ns:
        t = _now()
    tl.store(buf, t)


@triton.jit
def probe_kernel(buf, PDL: tl.constexpr):
    tl.store(buf + 1, _now())
    _dependent(PDL)
    tl.store(buf + 2, _now())


@triton.jit
def small_kernel(x, PDL: tl.constexpr):
    _dependent(PDL)
    offs = tl.program_id(0) * 128 + tl.arange(0, 128)
    tl.store(x + offs, tl.load(x + offs) + 1.0)


def _captured(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def probe(pdl: bool, sms: int) -> dict:
    """Start offsets of the dependent kernel and the per-boundary cost, with or without PDL."""
    kw = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
    buf = torch.zeros(3, dtype=torch.int64, device="cuda")

    def pair():
        spin_kernel[(sms,)](buf, 20000, **kw)
        probe_kernel[(1,)](buf, **kw)

    _captured(pair).replay()
    torch.cuda.synchronize()
    spin_end, start, after_wait = buf.tolist()
    x = torch.zeros(sms * 128, device="cuda")
    chain = _captured(lambda: [small_kernel[(sms,)](x, **kw) for _ in range(20)])
    for _ in range(10):
        chain.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(200):
        chain.replay()
    end.record()
    torch.cuda.synchronize()
    return {"graph_start_minus_spin_end_us": (start - spin_end) / 1e3,
            "graph_after_wait_minus_spin_end_us": (after_wait - spin_end) / 1e3,
            "chain_us_per_kernel": begin.elapsed_time(end) * 1e3 / (200 * 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for launch_overlap_probe.json")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "plain": probe(False, sms), "pdl": probe(True, sms)}
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "launch_overlap_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
