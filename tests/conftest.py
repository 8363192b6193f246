"""Test-session setup.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before
anything imports triton (other test modules do, through torch), so it is set here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
