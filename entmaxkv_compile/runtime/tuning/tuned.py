"""The tuned-config store: JSON files in ``runtime/tuning/configs/``, one per GPU, read at run time.

A file is named after the GPU (``torch.cuda.get_device_name``, slugged) and maps a kernel family to
shape classes to launch parameters::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "date": "...",
     "kernels": {"paged_decode": {"fp16-d128-g4-p16": {"BLOCK_N": 64, ...}, "default": {...}}}}

Lookups never benchmark: a missing file, family or class falls back to the built-in defaults
below. ``autotune.autotune_main`` regenerates the file of the current GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Built-in defaults per kernel family; GPU files override them key by key.
DEFAULTS: dict[str, dict[str, int]] = {
    "paged_decode": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "BLOCK_T": 32,
                     "BLOCK_TAU": 128, "tau_warps": 4, "SHARE_EVERY": 0, "PROGRAMS_PER_SM": 8,
                     "TAU_PROGRAMS_PER_SM": 8, "out_warps": 4, "SLOT_TILES": 1, "MIN_SPLIT_PAGES": 1},
    "page_stats": {"BLOCK_T": 16, "num_warps": 4},
    "select": {"BLOCK_P": 64, "BLOCK_PM": 32, "BLOCK_PS": 256,
               "num_warps": 4, "MOMENTS_DOT": 0, "MOMENTS_BLOCKS": 1,
               "SCAN_BLOCK_N": 64, "SCAN_WARPS": 4, "SCAN_PROGRAMS_PER_SM": 4, "SCAN_FAST_CODES": 1},
}

# Small blocks keep the CPU interpreter fast; it has no notion of warps or stages.
INTERPRETER: dict[str, dict[str, int]] = {
    "paged_decode": {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "BLOCK_T": 16,
                     "BLOCK_TAU": 16, "tau_warps": 1, "SHARE_EVERY": 1, "PROGRAMS_PER_SM": 8,
                     "TAU_PROGRAMS_PER_SM": 8, "out_warps": 1, "SLOT_TILES": 1, "MIN_SPLIT_PAGES": 2},
    "page_stats": {"BLOCK_T": 16, "num_warps": 1},
    "select": {"BLOCK_P": 16, "BLOCK_PM": 16, "BLOCK_PS": 16, "num_warps": 1,
               "MOMENTS_DOT": 0, "MOMENTS_BLOCKS": 2, "SCAN_BLOCK_N": 16, "SCAN_WARPS": 1,
               "SCAN_PROGRAMS_PER_SM": 8, "SCAN_FAST_CODES": 0},
}


# Set only while ``autotune`` measures a candidate (see :func:`override`).
_OVERRIDES: dict[str, dict[str, int]] = {}


@contextlib.contextmanager
def override(family: str, params: dict[str, int]) -> Iterator[None]:
    """Use ``params`` for ``family`` inside the block (the autotuner's candidate)."""
    _OVERRIDES[family] = dict(params)
    try:
        yield
    finally:
        _OVERRIDES.pop(family, None)


def gpu_slug(name: str) -> str:
    """A file-name-safe form of a GPU name, e.g. ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name(device: torch.device) -> str:
    """The GPU name of a CUDA device, ``"cpu"`` otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def shape_class(dtype: torch.dtype, head_dim: int, group: int, page_size: int) -> str:
    """The key of a tuned config: dtype, head dim, GQA group size and page size."""
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    return f"{short}-d{head_dim}-g{group}-p{page_size}"


@functools.lru_cache(maxsize=None)
def load_store(name: str) -> dict[str, Any]:
    """The parsed config file of a GPU name (empty when there is none)."""
    path = CONFIG_DIR / f"{gpu_slug(name)}.json"
    if not path.is_file():
        return {}
    with path.open() as fh:
        data = json.load(fh)
    kernels = data.get("kernels")
    if not isinstance(kernels, dict):
        raise ValueError(f"tuned config {path.name} has no 'kernels' mapping")
    return kernels


# Cache capacities (tokens) that split the tuned configs into length buckets: short caches are
# launch-bound, long ones bandwidth-bound, and their best grids differ.
LENGTH_BUCKETS = (65536, 524288)


def length_bucket(capacity: int) -> str:
    """The length bucket of a cache capacity in tokens: ``n64k``, ``n512k`` or ``nlong``."""
    for top in LENGTH_BUCKETS:
        if capacity <= top:
            return f"n{top // 1024}k"
    return "nlong"


def lookup(family: str, device: torch.device, key: str, capacity: int | None = None,
           sparse: bool = False) -> dict[str, int]:
    """Launch parameters of ``family`` for shape class ``key`` on ``device``: the built-in
    defaults, then the GPU file's ``default``, ``key`` and ``key-<length bucket>`` entries, and
    with ``sparse`` the ``key-<length bucket>-sparse`` entry on top."""
    if device.type != "cuda":
        cfg = dict(INTERPRETER[family])
    else:
        cfg = dict(DEFAULTS[family])
        table = load_store(device_name(device)).get(family, {})
        cfg.update(table.get("default", {}))
        cfg.update(table.get(key, {}))
        if capacity is not None:
            cfg.update(table.get(f"{key}-{length_bucket(capacity)}", {}))
            if sparse:
                cfg.update(table.get(f"{key}-{length_bucket(capacity)}-sparse", {}))
    cfg.update(_OVERRIDES.get(family, {}))
    return cfg


def decode_config(device: torch.device, dtype: torch.dtype, head_dim: int, group: int,
                  page_size: int, capacity: int | None = None, sparse: bool = False) -> dict[str, int]:
    """Launch parameters of the fused decode kernels (``capacity``: the cache's rows). ``sparse``:
    the decode reads a page selection, not every page: the K pass and the threshold then see the
    candidates of a few pages, whatever the capacity, and are tuned apart."""
    return lookup("paged_decode", device, shape_class(dtype, head_dim, group, page_size), capacity, sparse)
