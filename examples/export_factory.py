"""A factory for the offline rewrite and export commands (see README.md, docs/export.md).

``make()`` returns ``(model, example_decode_args)``: a small gpt-fast-style entmax15 decoder whose
static cache already holds a 37-token prefill, and the arguments of the next decode step.

    entmaxkv-compile rewrite examples/export_factory.py:make -o step.pt2
    entmaxkv-compile export examples/export_factory.py:make --format onnx -o step.onnx --verify
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.zoo import gpt_fast  # noqa: E402


def make():
    model = gpt_fast.build(gpt_fast.ModelArgs(), batch=2)
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(0)), torch.arange(37))
    return model, (torch.tensor([[3], [7]]), torch.tensor([37]))
