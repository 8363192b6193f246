"""Deterministic, chunked generation shared by the data families: one seeded generator per
(seed, tag, chunk), so a family's tensors do not depend on the device's chunking of the work."""

from __future__ import annotations

import zlib

import torch

CHUNK = 1 << 16  # tokens generated per seeded chunk


def _gen(device: torch.device | str, seed: int, *parts: object) -> torch.Generator:
    """A generator on ``device`` seeded by ``seed`` and a stable hash of ``parts``."""
    salt = zlib.crc32(repr(parts).encode())
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + salt) % (1 << 62))
