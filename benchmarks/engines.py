"""Engines on the GPU: the AOTInductor package of the rewritten step, from Python and from C++.

The model and caches are those of ``benchmarks/e2e.py`` (the zoo's gpt-fast entmax15 model, its
caches filled with planted-span keys aligned with each layer's query); every method decodes the
same fixed token from position ``context`` on. Methods, ms/token (the median step, the device
synchronised around each step, as the C++ runner times it):

- ``compiled``: ``torch.compile(backend="entmaxkv", mode="reduce-overhead")``, the Python step;
- ``package_python``: the AOTInductor package (``export_aoti(..., device="cuda")``: our Triton
  kernels compiled into it) loaded with ``torch._inductor.aoti_load_package``;
- ``package_cpp``: the same package run by ``examples/aoti_runner`` (built here with CMake against
  the libtorch inside the installed torch), no Python in the loop;
- ``eager``: the uncompiled model (dense sort-based entmax): the logit reference of every row.

    python benchmarks/engines.py --out OUT                  # H200: 32k context, certified
    python benchmarks/engines.py --contexts 4096 --out OUT  # a shorter context

Writes ``OUT/engines.json``; the last lines printed are the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import e2e, report  # noqa: E402
from entmaxkv_compile import EntmaxKVConfig  # noqa: E402
from entmaxkv_compile.compiler.rewrite import rewrite  # noqa: E402
from entmaxkv_compile.export.aoti import export_aoti, save_runner_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLAN = dict(e2e.PRESETS["quick"], steps=16, warmup=3)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@torch.no_grad()
def _steps(step_fn, context: int, steps: int) -> tuple[list[float], torch.Tensor]:
    """ms of each of ``steps`` calls (synchronised around each) and their last-position logits."""
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    times, logits = [], []
    for step in range(steps):
        position = torch.tensor([context + step], device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = step_fn(token, position)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        logits.append(out[:, -1].float().clone())
    return times, torch.cat(logits)


def build_runner(build: Path) -> Path:
    """``examples/aoti_runner`` built with CMake against the installed torch's libtorch."""
    subprocess.run(["cmake", "-S", str(ROOT / "examples" / "aoti_runner"), "-B", str(build),
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "8"], check=True, capture_output=True, text=True)
    return build / "aoti_runner"


def _runner_numbers(stdout: str) -> dict:
    lines = dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)
    mean, median, low = (float(x) for x in lines["ms/token"].split()[1:6:2])
    return dict(ms=median, ms_mean=mean, ms_min=low, first_ms=float(lines["first step"].split()[0]),
                max_abs_error=float(lines["max abs error vs expected"]))


def run_context(context: int, selector: str, out: Path, runner: Path) -> list[dict]:
    plan, steps, rows = PLAN, PLAN["warmup"] + PLAN["steps"], []
    fill = e2e.planted_fill(plan, context, seed=0)
    model = e2e.build(plan, context, "own_entmax15", fill)
    eager_times, eager = _steps(model, context, steps)  # the reference logits
    del model
    scale = float(eager.abs().max())

    def row(method: str, times: list[float], logits: torch.Tensor, **extra) -> None:
        timed = times[plan["warmup"]:]
        entry = dict(context=context, selector=selector, method=method, ms=statistics.median(timed),
                     ms_mean=statistics.fmean(timed), first_ms=times[0], **extra)
        entry["max_abs_error"] = float((logits - eager).abs().max())
        entry["relative_error"] = entry["max_abs_error"] / scale
        _say(f"{context} {method}: {entry['ms']:.3f} ms/token, max abs error {entry['max_abs_error']:.3g}")
        rows.append(entry)

    row("eager", eager_times, eager)
    model = e2e.build(plan, context, "own_entmax15", fill)
    compiled = e2e._compiled(plan, f"entmaxkv_{selector}", model, context)
    row("compiled", *_steps(compiled, context, steps))
    del compiled, model
    e2e._release("cuda")

    model = e2e.build(plan, context, "own_entmax15", fill)
    args = (torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.tensor([context], device="cuda"))
    result = rewrite(model, args, EntmaxKVConfig(selector=selector, page_size=e2e.PAGE))
    start = time.perf_counter()
    exported = export_aoti(result, out / f"step_{context}_{selector}.pt2", device="cuda", progress=_say)
    export_s = time.perf_counter() - start
    del result, model
    e2e._release("cuda")
    package = exported.load()
    row("package_python", *_steps(package, context, steps), export_s=export_s,
        package_mb=exported.path.stat().st_size / 2**20)
    del package
    e2e._release("cuda")

    token = torch.zeros(1, 1, dtype=torch.long)
    inputs = save_runner_inputs(out / f"inputs_{context}.pt", [token] * steps,
                                [torch.tensor([context + s]) for s in range(steps)],
                                [e.view(1, -1).cpu() for e in eager.view(steps, 1, -1)])
    ran = subprocess.run([str(runner), str(exported.path), str(inputs)], capture_output=True, text=True, check=True)
    numbers = _runner_numbers(ran.stdout)
    numbers["relative_error"] = numbers["max_abs_error"] / scale
    rows.append(dict(context=context, selector=selector, method="package_cpp", **numbers))
    _say(f"{context} package_cpp: {numbers['ms']:.3f} ms/token (median of steps 2-{steps}), "
         f"max abs error {numbers['max_abs_error']:.3g}")
    exported.path.unlink()  # packages hold the caches: large
    inputs.unlink()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| context | selector | method | ms/token | max abs error (rel.) |", "|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['selector']} | {r['method']} | {r['ms']:.3f} | "
                     f"{r['max_abs_error']:.2g} ({r['relative_error']:.1e}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768])
    parser.add_argument("--selectors", nargs="+", default=["certified"], choices=list(e2e.SELECTORS))
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (the CPU package is tested in tests/test_export_aoti.py)")
    options.out.mkdir(parents=True, exist_ok=True)
    _say("building examples/aoti_runner")
    runner = build_runner(options.out / "aoti_runner_build")
    rows = []
    for context in options.contexts:
        for selector in options.selectors:
            rows += run_context(context, selector, options.out, runner)
    meta = report.environment(torch.device("cuda"))
    meta.update(plan=PLAN, rows=rows)
    (options.out / "engines.json").write_text(json.dumps(meta, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
