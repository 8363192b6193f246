"""Triton kernels of entmaxkv_compile: the CUDA implementations of the ``entmaxkv`` ops.

Each launcher takes the same arguments and returns the same results as its reference in
``runtime/<stage>/reference.py`` (stats, select, attend, certify), and is registered as a
``torch.library.triton_op`` named ``entmaxkv::triton_<name>`` (so Inductor and torch.export see
one op per launcher). On a CPU they run only under the Triton interpreter (``TRITON_INTERPRET=1``
set before this package is imported), which is how CI tests them.
"""

from __future__ import annotations

import os

import torch

from .attend.kernel import paged_decode, paged_decode_verdict
from .attend.partial import gather_above, local_candidates, partial_sums, solve_gathered
from .certify.kernel import certified_heads, certify, certify_pages, certify_policy_update_
from .select.kernel import compact_page_mask, quest_bounds, select_pages
from .sketch.kernel import sketch_page_bounds, sketch_select
# No kernels yet: the pure-torch floor and token-level bound of the approximate selectors' report
# run on the device (one sort per head; no host sync).
from .sketch.reference import sketch_delta_bound, sketch_tau_floor
from .stats.kernel import stats_append_, stats_prefill_, stats_rebuild_page_

__all__ = [
    "available",
    "certified_heads",
    "certify",
    "certify_pages",
    "certify_policy_update_",
    "compact_page_mask",
    "gather_above",
    "local_candidates",
    "paged_decode",
    "paged_decode_verdict",
    "partial_sums",
    "quest_bounds",
    "select_pages",
    "sketch_delta_bound",
    "sketch_page_bounds",
    "sketch_select",
    "sketch_tau_floor",
    "solve_gathered",
    "stats_append_",
    "stats_prefill_",
    "stats_rebuild_page_",
]


def interpreter_enabled() -> bool:
    """Whether these kernels, and Triton's own ``tl.zeros``/``tl.sum``/... helpers, were built
    for the CPU interpreter: ``TRITON_INTERPRET=1`` must be set before ``triton`` is first
    imported (by anything, e.g. torch.compile), not only before this package."""
    import triton.language.standard as triton_standard

    from .attend.decode_kernels import score_kernel

    return (os.environ.get("TRITON_INTERPRET", "0") == "1"
            and type(score_kernel).__name__ == "InterpretedFunction"
            and type(triton_standard.zeros).__name__ == "InterpretedFunction")


def available(device: torch.device | str) -> bool:
    """Whether these kernels can run on ``device``.

    True on a CUDA device (compute capability 8.0 or newer, which Triton's ``tl.dot`` paths here
    need), and on the CPU only when the caller asked for the interpreter by setting
    ``TRITON_INTERPRET=1`` before importing Triton.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if interpreter_enabled() or not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and interpreter_enabled()
