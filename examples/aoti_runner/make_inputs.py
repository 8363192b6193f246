"""Write the inputs file of the C++ runner: greedy decode steps of a factory's eager model.

    python examples/aoti_runner/make_inputs.py examples/export_factory.py:make --steps 32 -o inputs.pt

Runs the factory's model (the same prefilled state the package was exported from) for ``--steps``
greedy decode steps from its example arguments and saves each step's token, position and logits
with :func:`entmaxkv_compile.export.aoti.save_runner_inputs`. The factory's decode arguments must
be ``(token [B, 1], position [1])``, as gpt-fast-style models take them.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from entmaxkv_compile.cli import load_factory  # noqa: E402
from entmaxkv_compile.export.aoti import save_runner_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", metavar="MODULE:FACTORY")
    parser.add_argument("--steps", type=int, default=32, help="decode steps (default 32)")
    parser.add_argument("-o", "--output", required=True, help="the inputs file to write")
    options = parser.parse_args()
    if options.steps < 1:
        parser.error(f"--steps must be >= 1, got {options.steps}")
    model, args = load_factory(options.target)
    if len(args) != 2 or not all(isinstance(a, torch.Tensor) for a in args):
        parser.error("the factory's decode arguments must be (token [B, 1], position [1])")
    token, position = args
    tokens, positions, logits = [], [], []
    with torch.no_grad():
        for step in range(options.steps):
            out = model(token, position + step)
            tokens.append(token)
            positions.append(position + step)
            logits.append(out)
            token = out[:, -1].argmax(-1, keepdim=True)
    path = save_runner_inputs(options.output, tokens, positions, logits)
    print(f"saved {options.steps} decode steps to {path}")


if __name__ == "__main__":
    main()
