"""Test-session setup and the fixtures several test modules share.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before
anything imports triton (other test modules do, through torch), so it is set here. The kernel
tests run on ``KERNEL_DEVICE`` (``ENTMAXKV_KERNEL_TEST_DEVICE``, default ``cpu``: interpreter,
tiny shapes; ``cuda``: compiled, real shapes, see benchmarks/gpu_check.py); a module marked
``pytest.mark.kernels`` is skipped where the kernels cannot run on that device.
"""

import os

import pytest
import torch

KERNEL_DEVICE = os.environ.get("ENTMAXKV_KERNEL_TEST_DEVICE", "cpu")
KERNEL_REAL_SHAPES = KERNEL_DEVICE != "cpu"

if not torch.cuda.is_available() or KERNEL_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: Triton kernel tests, run on KERNEL_DEVICE")


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("kernels")]
    if not marked:
        return
    from entmaxkv_compile.runtime import kernels

    if kernels.available(KERNEL_DEVICE):
        return
    skip = pytest.mark.skip(reason=f"Triton kernels cannot run on {KERNEL_DEVICE} (on a CPU, "
                                   "TRITON_INTERPRET=1 must be set before anything imports triton)")
    for item in marked:
        item.add_marker(skip)


def on_kernel_device(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every tensor argument moved to ``KERNEL_DEVICE`` and every tensor
    it returns moved back to the CPU, so a kernel test builds its inputs and compares on the CPU
    whichever device the kernels run on."""
    from torch.utils._pytree import tree_map

    def move(device):
        return lambda x: x.to(device) if isinstance(x, torch.Tensor) else x

    args, kwargs = tree_map(move(KERNEL_DEVICE), (args, kwargs))
    return tree_map(move("cpu"), fn(*args, **kwargs))


def _zoo_step(context: int = 21, batch: int = 2, seed: int = 0, **model_args):
    """A prefilled gpt-fast zoo model and the arguments of its next decode step."""
    from examples.zoo import gpt_fast

    args = gpt_fast.ModelArgs(**model_args)
    model = gpt_fast.build(args, batch=batch, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, args.vocab_size, (batch, context), generator=generator)
    with torch.no_grad():
        model(prompt, torch.arange(context))
    token = torch.randint(0, args.vocab_size, (batch, 1), generator=generator)
    return model, (token, torch.tensor([context]))


@pytest.fixture(scope="session")
def zoo_step():
    """``zoo_step(context=21, batch=2, seed=0, **model_args) -> (model, decode_args)``: a
    prefilled gpt-fast zoo model and the arguments of its next decode step."""
    return _zoo_step
