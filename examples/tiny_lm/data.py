"""The training and evaluation text: the running interpreter's standard-library source, as bytes.

Every machine with Python has it, so nothing is downloaded. Files are ``*.py`` under
``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded), in sorted order. A file is held out
for evaluation when ``crc32(relative path) % 10 == 0``: the split depends only on the path, so it is
the same on every machine and Python version (the file contents may differ between versions).
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

__all__ = ["DOC_SEPARATOR", "stdlib_files", "is_held_out", "load_split", "sample_batch", "eval_windows"]

DOC_SEPARATOR = 0  # byte 0 never occurs in source text; it marks file boundaries in the train stream
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every ``*.py`` under the stdlib, sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib directory not found: {root}")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts) and path.is_file():
            files.append((rel.as_posix(), path))
    return sorted(files)


def is_held_out(rel_path: str) -> bool:
    """True for the ~10% of files kept for evaluation (a stable hash of the path)."""
    return zlib.crc32(rel_path.encode()) % 10 == 0


def load_split(root: str | Path | None = None) -> tuple[torch.Tensor, list[tuple[str, bytes]]]:
    """The training stream (uint8, files joined by :data:`DOC_SEPARATOR`) and the held-out files."""
    train_parts: list[bytes] = []
    held_out: list[tuple[str, bytes]] = []
    for rel, path in stdlib_files(root):
        data = path.read_bytes().replace(bytes([DOC_SEPARATOR]), b"")
        if is_held_out(rel):
            held_out.append((rel, data))
        else:
            train_parts.append(data)
    stream = bytes([DOC_SEPARATOR]).join(train_parts)
    return torch.frombuffer(bytearray(stream), dtype=torch.uint8), held_out


def sample_batch(
    stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the stream: inputs and next-byte targets, int64 ``[batch, seq_len]``."""
    if stream.numel() <= seq_len + 1:
        raise ValueError(f"stream has {stream.numel()} bytes, fewer than seq_len + 2 = {seq_len + 2}")
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=generator)
    offsets = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = stream[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def eval_windows(held_out: list[tuple[str, bytes]], length: int, count: int) -> list[tuple[str, torch.Tensor]]:
    """Up to ``count`` held-out windows of ``length`` bytes: the first bytes of the longest-enough files.

    Each window comes from one file, so long-range structure (imports, definitions used far below)
    is real. Files are taken in sorted-path order among those with at least ``length`` bytes.
    """
    if length < 2 or count < 1:
        raise ValueError(f"length must be >= 2 and count >= 1, got {length} and {count}")
    windows = []
    for rel, data in held_out:
        if len(data) >= length:
            windows.append((rel, torch.frombuffer(bytearray(data[:length]), dtype=torch.uint8).long()))
            if len(windows) == count:
                break
    return windows
