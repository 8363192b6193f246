"""``entmaxkv-compile``: help, the rewrite/export/explain/bench/autotune commands, and their errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entmaxkv_compile.cli import CommandError, build_parser, load_factory, main

REPO = Path(__file__).resolve().parents[1]

FACTORY = '''
import sys
sys.path.insert(0, {repo!r})
import torch
from examples.zoo import gpt_fast


def make():
    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, weights={weights!r}), batch=2, seed=4)
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(4)), torch.arange(19))
    return model, (torch.tensor([[3], [7]]), torch.tensor([19]))


def not_a_pair():
    return 42
'''


def write_factory(tmp_path: Path, weights: str = "entmax15") -> Path:
    path = tmp_path / f"factory_{weights}.py"
    path.write_text(FACTORY.format(repo=str(REPO), weights=weights))
    return path


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("rewrite", "export", "explain", "bench", "autotune"):
        assert command in out


@pytest.mark.parametrize("command", ["rewrite", "export", "explain", "bench"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "MODULE:FACTORY" in out
    if command in ("rewrite", "export", "bench"):
        assert "--selector" in out and "--page-size" in out and "--token-budget" in out


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "entmaxkv_compile.cli", "export", "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--format" in result.stdout and "--decompose" in result.stdout


def test_rewrite_command_writes_a_loadable_program(tmp_path, capsys):
    factory = write_factory(tmp_path)
    out_path = tmp_path / "out" / "step.pt2"
    code = main(["rewrite", f"{factory}:make", "-o", str(out_path), "--selector", "certified", "--page-size", "8"])
    assert code == 0
    captured = capsys.readouterr()
    assert "layers.0.attention" in captured.out and "rewritten" in captured.out
    assert "exporting the decode step" in captured.err and "done in" in captured.err  # progress on stderr
    program = torch.export.load(str(out_path))
    model, args = load_factory(f"{factory}:make")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*args), model(*args), rtol=1e-5, atol=1e-5)


def test_export_onnx_command_verifies_against_pytorch(tmp_path, capsys):
    factory = write_factory(tmp_path)
    out_path = tmp_path / "step.onnx"
    code = main(["export", f"{factory}:make", "--format", "onnx", "-o", str(out_path), "--verify",
                 "--selector", "dense", "--page-size", "8", "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert out_path.exists() and "'past_key_values.0.key'" in captured.out  # optimum's cache names
    assert (tmp_path / "step.stats.onnx").exists() and "page-statistics graph" in captured.out
    assert "'idx', 'input_pos']" in captured.out  # the model's argument names
    assert "onnxruntime vs PyTorch: max abs error" in captured.out
    assert captured.err == ""  # --quiet


def test_export_tensorrt_without_tensorrt_fails_clearly(tmp_path, capsys):
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch-tensorrt is installed: the missing-TensorRT message cannot be observed")
    factory = write_factory(tmp_path)
    code = main(["export", f"{factory}:make", "--format", "tensorrt", "-o", str(tmp_path / "x.ep"), "-q"])
    assert code == 1
    err = capsys.readouterr().err
    assert "entmaxkv-compile export: error:" in err and "torch-tensorrt" in err


def test_unsupported_model_exits_1_with_the_reason(tmp_path, capsys):
    factory = write_factory(tmp_path, weights="softmax")
    code = main(["rewrite", f"{factory}:make", "-o", str(tmp_path / "x.pt2"), "-q"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no attention site" in err and "not-entmax" in err
    assert not (tmp_path / "x.pt2").exists()


@pytest.mark.parametrize(
    "target, message",
    [
        ("no_colon_here", "expected MODULE:FACTORY"),
        ("does/not/exist.py:make", "is not a file"),
        ("entmaxkv_compile_no_such_module:make", "cannot import"),
        ("{factory}:missing", "has no callable 'missing'"),
        ("{factory}:not_a_pair", "must return (model, example_decode_args)"),
    ],
)
def test_bad_targets_are_reported(target, message, tmp_path, capsys):
    target = target.format(factory=write_factory(tmp_path))
    code = main(["rewrite", target, "-o", str(tmp_path / "x.pt2"), "-q"])
    assert code == 1
    assert message in capsys.readouterr().err


def test_bad_config_values_are_reported(tmp_path, capsys):
    factory = write_factory(tmp_path)
    assert main(["rewrite", f"{factory}:make", "-o", str(tmp_path / "x.pt2"), "--page-size", "12", "-q"]) == 1
    assert "page_size must be a power of two" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse rejects unknown choices itself
        main(["rewrite", f"{factory}:make", "-o", "x.pt2", "--selector", "fastest"])
    assert info.value.code == 2


def test_load_factory_checks_the_model_type(tmp_path):
    path = tmp_path / "bad_model.py"
    path.write_text("def make():\n    return 'model', ()\n")
    with pytest.raises(CommandError, match="expected torch.nn.Module"):
        load_factory(f"{path}:make")


def test_explain_command_prints_the_site_table(tmp_path, capsys):
    factory = write_factory(tmp_path)
    assert main(["explain", f"{factory}:make"]) == 0
    out = capsys.readouterr().out
    assert "status" in out and "layers.0.attention" in out and "rewritten" in out


def test_bench_command_times_both_steps(tmp_path, capsys):
    factory = write_factory(tmp_path)
    assert main(["bench", f"{factory}:make", "--steps", "2", "-q", "--selector", "certified"]) == 0
    out = capsys.readouterr().out
    assert "eager" in out and "rewritten" in out and "ms/step" in out
    error = float(out.split("first step's outputs: ")[1].split()[0])
    assert error < 1e-4
    assert main(["bench", f"{factory}:make", "--steps", "0", "-q"]) == 1


def test_autotune_is_forwarded(capsys):
    assert main(["autotune", "--help"]) == 0
    assert "--length" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["autotune", "--quick"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_parser_maps_every_config_field():
    from dataclasses import fields

    from entmaxkv_compile.config import EntmaxKVConfig

    args = build_parser().parse_args(["rewrite", "m:f", "-o", "x"])
    assert {name[4:] for name in vars(args) if name.startswith("cfg_")} == {f.name for f in fields(EntmaxKVConfig)}


def test_version_flag_prints_the_package_version(capsys):
    import entmaxkv_compile

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"entmaxkv-compile {entmaxkv_compile.__version__}"


def test_every_flag_has_help_and_the_epilog_lists_the_exit_codes():
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("", parser), *((n, p) for n, p in commands.choices.items() if n != "autotune")]:
        for action in sub._actions:
            if action.option_strings:
                assert action.help, f"{name} {action.option_strings} has no help"
        if sub is not parser:
            for code in ("0 ", "1 ", "2 ", "130"):
                assert f"  {code}" in sub.format_help(), f"{name}: exit code {code} missing from --help"
