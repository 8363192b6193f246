"""One eager launch of the step kernels worth a hardware profile, for Nsight Compute to read.

Each ``--case`` builds planted-span caches (2% of the pages) at ``--length`` (GQA 32/8, D 128,
fp16) and runs one step per variant, so that ``ncu -k regex:<kernel>`` sees one launch of the
kernel per variant, in this order:

- ``moments``: the gaussian step with compact moments, contiguous cache then through a shuffled
  block table (``moments_kernel``: 268 MB at 1M, 63 us at the copy roofline; it took 116 in the
  FMA form, 74 in the one-pass-dot form the H200 config ships for 1M);
- ``keep``: the same steps as ``moments``, for the selection's keep kernel (16.8 MB of page
  moments at 1M, 4 us of reading; 14-16 us measured);
- ``score``: the dense step, contiguous then through the table (``score_kernel``: the table
  cost 9-14% there before the page-by-page K tiles, 0.5-1% after; the target is < 5%);
- ``scan``: the certified step with the int8 key sketch (``scan_kernel``: 1.14 GB at 1M, 265 us
  at the roofline; it took 739).

``--sass DIR`` also writes each launched kernel's PTX and SASS (``cuobjdump``) there. Example::

    ncu --clock-control none -k regex:moments_kernel -c 2 --set full \\
        python benchmarks/ncu_kernels.py --case moments

Stall reasons per instruction (where a kernel waits, and on what): add ``--import-source yes -o
REPORT`` to the profile, then ``ncu --import REPORT.ncu-rep --page source --csv --print-source
sass`` lists every SASS instruction with its executed count and sampled stall reasons
(Triton's line table does not carry per-line metrics into the ``cuda`` view).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.block_table import PAGE, block_order, contiguous_and_table_steps  # noqa: E402
from benchmarks.data_families import generate  # noqa: E402
from entmaxkv_compile import EntmaxKVConfig, KVPageStats  # noqa: E402
from entmaxkv_compile.runtime.attend import decode_kernels  # noqa: E402
from entmaxkv_compile.runtime.decoder import Decoder  # noqa: E402
from entmaxkv_compile.runtime.select import select_kernels  # noqa: E402
from entmaxkv_compile.runtime.sketch import sketch_kernels  # noqa: E402
from entmaxkv_compile.runtime.sketch.reference import KeySketch  # noqa: E402

KERNELS = {"moments": select_kernels.moments_kernel, "keep": select_kernels.keep_kernel,
           "score": decode_kernels.score_kernel, "scan": sketch_kernels.scan_kernel}


def run_case(case: str, length: int, device: torch.device) -> None:
    q, k, v = generate("planted2", 1, 32, 8, length, 128, torch.float16, device)
    seqlens = torch.full((1,), length, dtype=torch.int32, device=device)
    if case in ("moments", "keep", "score"):  # the contiguous step, then the same pages behind a shuffled table
        perm = block_order(length // PAGE, "shuffled", torch.Generator(device=device).manual_seed(0), device)
        for step in contiguous_and_table_steps(q, k, v, seqlens, "dense" if case == "score" else "gaussian_c",
                                               perm):
            step()
    else:
        config = EntmaxKVConfig(selector="certified", certify_sketch="int8")
        stats = KVPageStats.from_cache(k, seqlens, PAGE, check_values=False)
        sketch = KeySketch.from_cache(k, seqlens, check_values=False)
        Decoder.for_cache(k, q.shape[1], config, stats=stats, cuda_graph=False, sketch=sketch).run(q, k, v, seqlens)
    torch.cuda.synchronize(device)


def dump_assembly(kernel, out: Path) -> None:
    """PTX and SASS of every compiled variant of ``kernel`` (Triton's per-device cache)."""
    out.mkdir(parents=True, exist_ok=True)
    for entry in kernel.device_caches.values():
        compiled = entry[0] if isinstance(entry, tuple) else entry
        for i, binary in enumerate(compiled.values()):
            stem = out / f"{kernel.__name__}_{i}"
            stem.with_suffix(".ptx").write_text(binary.asm["ptx"])
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(binary.asm["cubin"])
                cubin.flush()
                sass = subprocess.run([shutil.which("cuobjdump") or "cuobjdump", "-sass", cubin.name],
                                      capture_output=True, text=True)
                stem.with_suffix(".sass").write_text(sass.stdout or sass.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(KERNELS), required=True)
    parser.add_argument("--length", type=int, default=1 << 20)
    parser.add_argument("--sass", type=Path, help="folder for the kernel's PTX and SASS")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_kernels.py profiles GPU kernels: no CUDA device here")
    run_case(args.case, args.length, torch.device("cuda"))
    if args.sass:
        dump_assembly(KERNELS[args.case], args.sass)


if __name__ == "__main__":
    main()
