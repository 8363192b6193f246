"""AOTInductor export: the package of a rewritten zoo step, loaded in a fresh process, equals the model.

One compile per session (module-scoped fixture, about a minute and a half on 2 CPU cores). The C++
runner (examples/aoti_runner) is built and run only when ENTMAXKV_TEST_AOTI_RUNNER=1 (the build
takes a minute or two more). ENTMAXKV_TEST_AOTI_DEVICE=cuda compiles the package for the GPU
instead (our Triton kernels inside it) and checks it against the same eager CPU model.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.compiler.rewrite import rewrite
from entmaxkv_compile.export.aoti import export_aoti, save_runner_inputs

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
DEVICE = os.environ.get("ENTMAXKV_TEST_AOTI_DEVICE", "cpu")


@pytest.fixture(scope="module")
def package(zoo_step, tmp_path_factory):
    """(export, inputs file, expected logits): a certified 1-layer zoo step packaged for CPU, and
    the eager model's 16 greedy decode steps after the prefill."""
    model, args = zoo_step(context=13, batch=1, n_layer=1, dim=32, max_seq_len=48, seed=3)
    eager = copy.deepcopy(model)
    result = rewrite(model, args, EntmaxKVConfig(selector="certified", page_size=4))
    directory = tmp_path_factory.mktemp("aoti")
    messages = []
    exported = export_aoti(result, directory / "step.pt2", device=DEVICE, progress=messages.append)
    assert exported.device.type == DEVICE
    assert any("compiling and packaging with AOTInductor" in m and "done in" in m for m in messages)
    token, position = args
    tokens, positions, expected = [], [], []
    with torch.no_grad():
        for step in range(STEPS):
            logits = eager(token, position + step)
            tokens.append(token)
            positions.append(position + step)
            expected.append(logits)
            token = logits[:, -1].argmax(-1, keepdim=True)
    inputs = save_runner_inputs(directory / "inputs.pt", tokens, positions, expected)
    return exported, inputs, expected


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import torch

    package, inputs, device = sys.argv[1], sys.argv[2], sys.argv[3]
    step = torch._inductor.aoti_load_package(package)
    data = torch.load(inputs)
    worst = 0.0
    with torch.no_grad():
        for token, position, expected in zip(data["tokens"], data["positions"], data["expected"]):
            got = step(token.to(device), position.to(device)).cpu()
            worst = max(worst, float((got.double() - expected.double()).abs().max()))
    assert not any(name.startswith("entmaxkv_compile") for name in sys.modules), "our package was imported"
    print(f"steps {len(data['tokens'])} max_abs_error {worst:.3e}")
""")


def test_package_matches_the_eager_model_for_16_steps_in_a_fresh_process(package):
    """16 steps cross four page boundaries: the certificate reads the statistics of the new pages, so
    statistics that did not carry across calls could drop support pages and differ from the model."""
    exported, inputs, expected = package
    assert exported.input_names == ("idx", "input_pos")
    assert any(name.endswith("k_cache") for name in exported.state)
    assert sum(name.startswith("entmaxkv.") for name in exported.state) == 4  # kmin, kmax, kmean, km2
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(exported.path), str(inputs), DEVICE],
                         capture_output=True, text=True, cwd=exported.path.parent, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    steps, error = run.stdout.split()[1], float(run.stdout.split()[3])
    assert int(steps) == STEPS == len(expected)
    assert error <= 1e-5


def test_package_carries_the_statistics_across_calls(package):
    """Each call continues the sequence from the state the previous call left (step 2 needs the
    cache row and the statistics step 1 wrote), and a fresh load starts again from the exported state."""
    exported, inputs, expected = package
    data = torch.load(inputs)
    tokens, positions = [[t.to(DEVICE) for t in data[key]] for key in ("tokens", "positions")]
    step = exported.load()
    with torch.no_grad():
        first = step(tokens[0], positions[0]).cpu()
        torch.testing.assert_close(first, expected[0], rtol=1e-5, atol=1e-5)
        second = step(tokens[1], positions[1]).cpu()
        torch.testing.assert_close(second, expected[1], rtol=1e-5, atol=1e-5)
        again = exported.load()(tokens[0], positions[0]).cpu()
    torch.testing.assert_close(again, expected[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def other_cache(package):
    """(state, inputs file, expected): a cache filled by another 21-token prompt (same weights),
    the package state for it, and the eager model's 8 greedy steps after it."""
    from examples.zoo import gpt_fast

    exported, first_inputs, _ = package
    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=1, dim=32, max_seq_len=48), batch=1, seed=3)
    prompt = torch.randint(0, 96, (1, 21), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        model(prompt, torch.arange(21))
    caches = {name: model.get_buffer(name).clone() for name in exported.state if name.endswith("_cache")}
    state = exported.state_for(caches, torch.tensor([21]))
    token, tokens, positions, expected = torch.tensor([[7]]), [], [], []
    with torch.no_grad():
        for step in range(8):
            logits = model(token, torch.tensor([21 + step]))
            tokens.append(token)
            positions.append(torch.tensor([21 + step]))
            expected.append(logits)
            token = logits[:, -1].argmax(-1, keepdim=True)
    inputs = save_runner_inputs(first_inputs.with_name("other_inputs.pt"), tokens, positions, expected, state)
    return state, inputs, expected


def test_package_decodes_from_a_cache_loaded_into_it(package, other_cache):
    """Prefill elsewhere, decode in the package: the caches and their statistics (state_for) are
    loaded as constants, and the steps match the eager model on that cache."""
    exported, _, _ = package
    state, inputs, expected = other_cache
    assert sorted(state) == sorted(exported.state)  # both caches and the four statistics
    step = exported.load()
    step.load_constants({name: t.to(DEVICE) for name, t in state.items()}, check_full_update=False)
    data = torch.load(inputs)
    with torch.no_grad():
        for token, position, want in zip(data["tokens"], data["positions"], expected):
            torch.testing.assert_close(step(token.to(DEVICE), position.to(DEVICE)).cpu(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="named by the package's state"):
        exported.state_for({"k_cache": torch.zeros(1)}, torch.tensor([1]))


def test_export_aoti_rejects_bad_arguments(zoo_step, tmp_path):
    model, args = zoo_step(context=5, batch=1, n_layer=1, dim=32, max_seq_len=16)
    result = rewrite(model, args, EntmaxKVConfig(selector="dense", page_size=4))
    with pytest.raises(ValueError, match="path must end in .pt2"):
        export_aoti(result, tmp_path / "step.so")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        export_aoti(result, tmp_path / "step.pt2", device="meta")
    with pytest.raises(ValueError, match="one length"):
        save_runner_inputs(tmp_path / "x.pt", [args[0]], [])


@pytest.mark.skipif(os.environ.get("ENTMAXKV_TEST_AOTI_RUNNER") != "1",
                    reason="builds the C++ runner (slow); set ENTMAXKV_TEST_AOTI_RUNNER=1")
def test_cpp_runner_runs_the_package_without_python(package, other_cache, tmp_path):
    exported, inputs, _ = package
    if shutil.which("cmake") is None:
        pytest.fail("ENTMAXKV_TEST_AOTI_RUNNER=1 but cmake is not installed")
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(ROOT / "examples" / "aoti_runner"), "-B", str(build),
                                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                               capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True,
                              timeout=1200)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    run = subprocess.run([str(build / "aoti_runner"), str(exported.path), str(inputs)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert lines["steps"] == str(STEPS)
    assert float(lines["max abs error vs expected"]) <= 1e-5
    assert float(lines["ms/token"].split()[1]) > 0
    loaded = subprocess.run([str(build / "aoti_runner"), str(exported.path), str(other_cache[1])],
                            capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in loaded.stdout.splitlines())
    assert lines["state tensors loaded"] == "6" and lines["steps"] == "8"
    assert float(lines["max abs error vs expected"]) <= 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_aoti_command_for_cuda_without_a_gpu_fails_clearly(tmp_path, capsys):
    from entmaxkv_compile.cli import main

    code = main(["export", str(ROOT / "examples" / "export_factory.py") + ":make", "--format", "aoti",
                 "--device", "cuda", "-o", str(tmp_path / "step.pt2"), "-q", "--selector", "dense"])
    assert code == 1
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert not (tmp_path / "step.pt2").exists()
