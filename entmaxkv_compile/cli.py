"""``entmaxkv-compile``: the command line (rewrite, export, explain, bench, autotune).

Every model-taking command reads ``MODULE:FACTORY``: ``MODULE`` is an importable module name or a
path to a ``.py`` file, ``FACTORY`` a zero-argument callable in it returning
``(model, example_decode_args)`` (the model with its caches holding the context, and the
positional arguments of one decode step). Config options (``--selector``, ``--page-size``, ...)
are the fields of :class:`~entmaxkv_compile.config.EntmaxKVConfig`.

Exit status (also in ``--help``): see ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import importlib.util
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .config import CERTIFY_SKETCHES, MOMENT_DTYPES, SELECTORS, TAU_ESTIMATES, EntmaxKVConfig

__all__ = ["EXIT_CODES", "build_parser", "load_factory", "main"]

EXIT_CODES = """exit status:
  0    success
  1    the model, the factory or a value cannot be handled, or an optional dependency is
       missing (one line on stderr says why)
  2    the command line is wrong (argparse's usage error), or the command cannot run on this
       machine (autotune without a CUDA GPU)
  130  interrupted (Ctrl-C)"""

_CHOICES = {"selector": SELECTORS, "tau_estimate": TAU_ESTIMATES, "moment_dtype": MOMENT_DTYPES,
            "certify_sketch": CERTIFY_SKETCHES}


class CommandError(Exception):
    """A failure to report as one line, without a traceback."""


def _search(directory: Path) -> None:
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))


def _load_module(spec: str) -> Any:
    """Import a module by name or by file path (its directory and the working directory searched)."""
    _search(Path.cwd())  # console scripts do not search the working directory
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise CommandError(f"MODULE {spec!r} is not a file")
        _search(path.resolve().parent)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(path.stem, module)
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def load_factory(target: str) -> tuple[Any, tuple]:
    """Import ``MODULE:FACTORY``, call the factory, and check it returned ``(model, args)``."""
    import torch

    module_name, sep, factory_name = target.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise CommandError(f"expected MODULE:FACTORY (e.g. examples/zoo/gpt_fast.py:make), got {target!r}")
    try:
        module = _load_module(module_name)
    except ImportError as error:
        raise CommandError(f"cannot import {module_name!r}: {error}") from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise CommandError(f"{module_name!r} has no callable {factory_name!r}")
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise CommandError(f"{target} must return (model, example_decode_args), got {type(made).__name__}")
    model, args = made
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"{target} returned a model of type {type(model).__name__}, expected torch.nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise CommandError(f"{target} returned example_decode_args of type {type(args).__name__}, expected a tuple")
    return model, tuple(args)


def check_output_path(output: str, flag: str = "--output") -> Path:
    """Check, before any work, that ``output`` names a file that can be written.

    It must not be an existing directory (or end with a path separator); its nearest existing
    ancestor must be a writable directory (missing directories below it are created on save).
    """
    import os

    path = Path(output)
    if output.endswith(("/", "\\")) or path.is_dir():
        raise CommandError(f"{flag} {output!r} is a directory; give a file path (e.g. {Path(output) / 'step.pt2'})")
    ancestor = path.parent if str(path.parent) else Path(".")
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"{flag} {output!r}: {str(ancestor)!r} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise CommandError(f"{flag} {output!r}: directory {str(ancestor)!r} is not writable")
    return path


def _non_negative_float(text: str) -> float:
    """argparse type of ``--tolerance``: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (0.0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _field_help() -> dict[str, str]:
    """The first sentence of each field's entry in ``EntmaxKVConfig``'s docstring."""
    attributes = (EntmaxKVConfig.__doc__ or "").split("Attributes:", 1)[-1]
    entries = re.findall(r"^\s{8}(\w+): (.*?)(?=^\s{8}\w+: |\Z)", attributes, re.M | re.S)
    return {name: " ".join(text.replace("``", "").split()).split(". ")[0].rstrip(".").replace("%", "%%")
            for name, text in entries}  # argparse formats help with %


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decode config (EntmaxKVConfig fields)")
    hints = typing.get_type_hints(EntmaxKVConfig)
    described = _field_help()
    for field in dataclasses.fields(EntmaxKVConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        value_type = float if float in (kind, *typing.get_args(kind)) else (int if kind is int else str)
        group.add_argument(flag, dest=f"cfg_{field.name}", type=value_type, default=None,
                           choices=_CHOICES.get(field.name),
                           metavar=None if field.name in _CHOICES else field.name.upper(),
                           help=f"{described.get(field.name, field.name)} (default: {field.default!r})")


def _config_from(args: argparse.Namespace) -> EntmaxKVConfig:
    options = {name[4:]: value for name, value in vars(args).items() if name.startswith("cfg_") and value is not None}
    return EntmaxKVConfig(**options)


def _progress(args: argparse.Namespace) -> Optional[Callable[[str], None]]:
    from .compiler.rewrite import print_progress

    return None if args.quiet else print_progress


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from .compiler.rewrite import rewrite

    check_output_path(args.output)
    config = _config_from(args)
    model, example = load_factory(args.target)
    result = rewrite(model, example, config, progress=_progress(args))
    print(result.report)
    path = result.save(args.output)
    print(f"saved the rewritten decode step to {path} (load with torch.export.load after "
          "`import entmaxkv_compile`)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .compiler.rewrite import rewrite

    check_output_path(args.output)
    config = _config_from(args)
    model, example = load_factory(args.target)
    progress = _progress(args)
    result = rewrite(model, example, config, progress=progress)
    print(result.report)
    if args.format == "onnx":
        from .export.onnx import export_onnx

        exported = export_onnx(result, args.output, decompose=args.decompose, check=not args.no_check,
                               opset_version=args.opset, progress=progress)
        print(f"saved ONNX model to {exported.path}: inputs {list(exported.input_names)}, "
              f"outputs {list(exported.output_names)}")
        if exported.stats_path is not None:
            print(f"saved its page-statistics graph to {exported.stats_path} (statistics of a filled cache; "
                  "for an empty cache feed zeros)")
        if args.verify:
            error = exported.max_abs_error(result.example_args)
            print(f"onnxruntime vs PyTorch: max abs error {error:.3g}")
            if error > args.tolerance:
                raise CommandError(f"onnxruntime differs from PyTorch by {error:.3g} > {args.tolerance}")
    elif args.format == "aoti":
        _export_aoti(args, result, progress)
    else:
        from .export.tensorrt import TensorRTUnavailableError, export_tensorrt

        try:
            exported = export_tensorrt(result, args.output, progress=progress)
        except TensorRTUnavailableError as error:
            raise CommandError(str(error)) from error
        print(f"saved TensorRT program to {exported.path}: inputs {list(exported.explicit.input_names)}, "
              f"outputs {list(exported.explicit.output_names)}")
    return 0


def _export_aoti(args: argparse.Namespace, result: Any, progress: Optional[Callable[[str], None]]) -> None:
    import torch

    from .export.aoti import export_aoti

    exported = export_aoti(result, args.output, device=args.device, progress=progress)
    print(f"saved AOTInductor package to {exported.path} ({exported.device.type}): call it with "
          f"{list(exported.input_names)}; state kept inside and updated by every call: {list(exported.state)}")
    if args.verify:
        step = copy.deepcopy(result.module()).to(exported.device)
        example = [a.to(exported.device) if isinstance(a, torch.Tensor) else a for a in result.example_args]
        with torch.no_grad():
            expected, got = step(*example), exported.load()(*example)
        error = max((float((a.double() - b.double()).abs().max()) for a, b in zip(
            torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got))), default=0.0)
        print(f"AOTInductor package vs PyTorch: max abs error {error:.3g}")
        if error > args.tolerance:
            raise CommandError(f"the AOTInductor package differs from PyTorch by {error:.3g} > {args.tolerance}")


def _cmd_explain(args: argparse.Namespace) -> int:
    try:
        from .compiler.explain import explain
    except ImportError as error:
        raise CommandError(f"explain is not available in this installation ({error})") from error
    model, example = load_factory(args.target)
    print(explain(model, *example))
    return 0


def _time_steps(step: Callable[[], Any], steps: int) -> float:
    """Seconds per call of ``step`` over ``steps`` calls after a warm-up, by
    ``torch.utils.benchmark`` (which synchronises CUDA around the timed calls)."""
    from torch.utils.benchmark import Timer

    return Timer(stmt="step()", globals={"step": step}).timeit(steps).mean


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .compiler.rewrite import rewrite
    from .tables import render_table

    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    model, example = load_factory(args.target)
    eager = copy.deepcopy(model)
    result = rewrite(model, example, _config_from(args), progress=_progress(args))
    rewritten = copy.deepcopy(result.module())
    with torch.no_grad():
        expected, got = eager(*example), rewritten(*example)
        error = max((float((a.float() - b.float()).abs().max()) for a, b in zip(
            torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got))
            if isinstance(a, torch.Tensor)), default=0.0)
        eager_s = _time_steps(lambda: eager(*example), args.steps)
        rewritten_s = _time_steps(lambda: rewritten(*example), args.steps)
    print(render_table(("step", "ms/step"), [("eager", f"{eager_s * 1e3:.3f}"),
                                              ("rewritten", f"{rewritten_s * 1e3:.3f}")], right=("ms/step",)))
    print(f"max abs difference of the first step's outputs: {error:.3g} "
          "(both repeat the same step; timings include the cache write)")
    return 0


def _run_autotune(argv: list[str]) -> int:
    """Forward ``argv`` to the kernels' autotuner (it has its own options: ``autotune --help``)."""
    try:
        from .runtime.tuning.autotune import autotune_main
    except ImportError as error:
        print(f"entmaxkv-compile autotune: error: autotune is not available in this installation ({error}); "
              "it needs the Triton kernels (pip install triton) and a CUDA GPU", file=sys.stderr)
        return 1
    try:
        return int(autotune_main(argv) or 0)
    except SystemExit as done:  # autotune's own argument parser (--help, usage errors)
        return done.code if isinstance(done.code, int) else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``entmaxkv-compile``."""
    parser = argparse.ArgumentParser(
        prog="entmaxkv-compile",
        description="Rewrite entmax-attention decode steps into support-aware sparse decoding.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    with_exit_codes = dict(epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target_help = "MODULE:FACTORY, FACTORY() -> (model, example_decode_args); MODULE: module name or .py path"

    rewrite_p = commands.add_parser(
        "rewrite", help="rewrite a decode step and save it as a .pt2 program", **with_exit_codes)
    rewrite_p.add_argument("target", metavar="MODULE:FACTORY", help=target_help)
    rewrite_p.add_argument("-o", "--output", required=True,
                           help="the .pt2 file to write (checked first; missing directories are created)")
    rewrite_p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _add_config_options(rewrite_p)
    rewrite_p.set_defaults(run=_cmd_rewrite)

    export_p = commands.add_parser(
        "export", help="export the rewritten decode step (ONNX, AOTInductor or TensorRT)", **with_exit_codes)
    export_p.add_argument("target", metavar="MODULE:FACTORY", help=target_help)
    export_p.add_argument("--format", choices=("onnx", "aoti", "tensorrt"), default="onnx",
                          help="onnx: a .onnx model (default); aoti: an AOTInductor .pt2 package; "
                               "tensorrt: a TensorRT program")
    export_p.add_argument("-o", "--output", required=True,
                          help="the file to write (checked first; missing directories are created)")
    export_p.add_argument("--decompose", action=argparse.BooleanOptionalAction, default=True,
                          help="ONNX: standard ops only, runs in onnxruntime (default); --no-decompose "
                               "keeps 'entmaxkv' custom-domain nodes for TensorRT plugins")
    export_p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    export_p.add_argument("--no-check", action="store_true", help="skip onnx.checker")
    export_p.add_argument("--verify", action="store_true",
                          help="ONNX: run onnxruntime, AOTI: load the package, and compare with PyTorch")
    export_p.add_argument("--tolerance", type=_non_negative_float, default=1e-4,
                          help="--verify: max abs error allowed (>= 0)")
    export_p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                          help="AOTI: the device to compile for (default cpu)")
    export_p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _add_config_options(export_p)
    export_p.set_defaults(run=_cmd_export)

    explain_p = commands.add_parser(
        "explain", help="list every attention site and what the passes do with it", **with_exit_codes)
    explain_p.add_argument("target", metavar="MODULE:FACTORY", help=target_help)
    explain_p.set_defaults(run=_cmd_explain)

    bench_p = commands.add_parser(
        "bench", help="time the eager and the rewritten decode step on this machine", **with_exit_codes)
    bench_p.add_argument("target", metavar="MODULE:FACTORY", help=target_help)
    bench_p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    bench_p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _add_config_options(bench_p)
    bench_p.set_defaults(run=_cmd_bench)

    # listed for --help only: main() forwards "autotune ..." to the autotuner before parsing
    commands.add_parser("autotune", help="tune the Triton kernels for this GPU (options: autotune --help)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``entmaxkv-compile`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["autotune"]:
        return _run_autotune(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .compiler.rewrite import UnsupportedModelError

    try:
        return args.run(args)
    except (CommandError, UnsupportedModelError, ValueError, TypeError) as error:
        print(f"entmaxkv-compile {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"entmaxkv-compile {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
