"""One GPU session: the package installed in place (for ``backend="entmaxkv"``), kernel tests at
real shapes, the CUDA-graph replay tests, autotuning (its file stays in ``$OUT``), and the decode
benchmark; logs and JSON go to ``$OUT`` (or ``--out``).

Usage on the lent GPU: ``python benchmarks/gpu_check.py [--skip-tests] [--skip-autotune]
[--bench-args "..."]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_kernels_stats.py", "tests/test_kernels_decode.py", "tests/test_kernels_ops.py",
         "tests/test_kernels_select.py", "tests/test_kernels_store.py", "tests/test_kernels_tau.py",
         "tests/test_kernels_partial.py", "tests/test_kernels_sketch.py", "tests/test_block_table.py",
         "tests/test_rolling.py", "tests/test_certify_policy.py", "tests/test_kernels_cudagraph.py"]


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    start = time.time()
    print(f"$ {' '.join(cmd)}", flush=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    tail = log.read_text().splitlines()[-40:]
    print("\n".join(tail))
    print(f"-> rc={proc.returncode} in {time.time() - start:.0f}s", flush=True)
    return proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-autotune", action="store_true")
    parser.add_argument("--bench-args", default="--preset quick",
                        help="arguments of benchmarks/decode.py (its JSON and plots go to OUT/decode)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ENTMAXKV_KERNEL_TEST_DEVICE="cuda", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    rc = 0
    # tests that compile through backend="entmaxkv" need the package's entry point
    rc |= _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", "."],
               args.out / "install.log", env)
    if not args.skip_tests:
        rc |= _run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                    *TESTS], args.out / "tests.log", env)
    if not args.skip_autotune:
        # written to OUT only: the shipped file also holds the selection kernels' swept values,
        # so chosen launch parameters go into runtime/tuning/configs/<gpu>.json by hand
        rc |= _run([sys.executable, "-c",
                    "import sys; from entmaxkv_compile.runtime.tuning.autotune import autotune_main; "
                    f"sys.exit(autotune_main(['--quick', '--out-dir', {str(args.out)!r}]))"],
                   args.out / "autotune.log", env)
    rc |= _run([sys.executable, "benchmarks/decode.py", "--out", str(args.out / "decode"),
                *shlex.split(args.bench_args)], args.out / "decode.log", env)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
