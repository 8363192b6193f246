"""Where a compiled end-to-end decode step spends its time: CUDA-graph use, launches, host time.

Builds the model of ``benchmarks/e2e.py`` (planted caches), compiles it with plain Inductor and
with the ``entmaxkv`` backend (``mode="reduce-overhead"``), and for each: ms/token over the timed
steps, Inductor's CUDA-graph skip counter with the skip messages it logged, and a
``torch.profiler`` table of a few steps (host ops and device kernels), so a compiled step that is
slower than plain Inductor can be attributed (graphs skipped, host overhead, or kernels). GPU only.

    python benchmarks/profile_e2e.py --out DIR [--context 32768] [--selectors gaussian,certified]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import e2e  # noqa: E402


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "cudagraph" in text.lower() or "skipping" in text.lower():
            self.messages.append(text[:400])


@contextlib.contextmanager
def _rewrites(method: str) -> Iterator[Any]:
    """What the backend rewrote (an explain report), for the entmaxkv methods only: importing the
    backend installs its tracing polyfills, which must not touch the plain-Inductor baseline."""
    if not method.startswith("entmaxkv_"):
        yield None
        return
    from entmaxkv_compile.compiler.explain import recording

    with recording() as report:
        yield report


def profile_method(plan: dict, method: str, context: int, fill: list, steps: int) -> dict:
    """ms/token, CUDA-graph skips and a profiler table for one compiled method."""
    from torch._dynamo.utils import counters

    counters.clear()
    handler = _Collect()
    logging.getLogger("torch").addHandler(handler)
    torch._logging.set_logs(perf_hints=True)
    weights = "softmax" if method == "sdpa_flash" else "own_entmax15"
    model = e2e.build(plan, context, weights, fill)
    step_fn = e2e._compiled(plan, method, model, context)
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    position = e2e.position_feed(plan, context, plan["warmup"] + steps + 5)
    with torch.no_grad(), _rewrites(method) as report:
        for step in range(plan["warmup"]):
            step_fn(token, position(step))
    rewrites = None if report is None else dict(
        table=str(report), graphs=len(report.graphs),
        marker_ops_left=[g.code_after.count("entmaxkv.entmax.") for g in report.graphs])
    with torch.no_grad():
        torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(steps):
            step_fn(token, position(plan["warmup"] + step))
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / steps * 1e3
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for step in range(5):
                step_fn(token, position(plan["warmup"] + steps + step))
            torch.cuda.synchronize()
    logging.getLogger("torch").removeHandler(handler)
    torch._logging.set_logs()
    events = prof.key_averages()
    launches = {e.key: e.count for e in events if "launch" in e.key.lower()}
    table_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    table_gpu = events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70)
    del step_fn, model
    e2e._release("cuda")
    return dict(method=method, context=context, ms_per_token=ms, rewrites=rewrites,
                cudagraph_skips=dict(counters["inductor"]), messages=handler.messages[:20],
                launch_calls_per_5_steps=launches, cpu_table=table_cpu, gpu_table=table_gpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--selectors", default="gaussian")
    parser.add_argument("--baselines", default="inductor", help="comma list of inductor, sdpa_flash")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--positions", choices=("device", "host"), default="device",
                        help="see benchmarks/e2e.py position_feed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_e2e needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    plan = dict(e2e.PRESETS["quick"], positions=args.positions)
    fill = e2e.planted_fill(plan, args.context, 0)
    methods = args.baselines.split(",") + [f"entmaxkv_{s}" for s in args.selectors.split(",")]
    rows = []
    for method in methods:
        row = profile_method(plan, method, args.context, fill, args.steps)
        rows.append(row)
        print(f"== {method} @ {args.context}: {row['ms_per_token']:.3f} ms/token; skips {row['cudagraph_skips']}")
        if row["rewrites"]:
            print(row["rewrites"]["table"], "\nmarker ops left per graph:", row["rewrites"]["marker_ops_left"])
        print("launch calls per 5 steps:", row["launch_calls_per_5_steps"])
        for message in row["messages"]:
            print("  log:", message)
        print(row["cpu_table"])
        print(row["gpu_table"], flush=True)
        (args.out / "profile_e2e.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
