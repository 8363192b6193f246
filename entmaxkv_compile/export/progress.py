"""Progress lines for the long stages of an export (tracing, ONNX translation, C++ compilation).

:func:`stage` says what is running, repeats a "still running" line every ``every`` seconds while
it runs (so a compile of a few minutes is never silent), and reports the duration at the end.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator, Optional

__all__ = ["ProgressFn", "stage"]

ProgressFn = Callable[[str], None]


@contextlib.contextmanager
def stage(progress: Optional[ProgressFn], label: str, every: float = 20.0) -> Iterator[None]:
    """Report ``label`` before, every ``every`` seconds during, and with its duration after a step.

    Nothing is reported when ``progress`` is None. ``every`` must be positive.
    """
    if progress is None:
        yield
        return
    if not every > 0:
        raise ValueError(f"every must be > 0 seconds, got {every}")
    progress(f"[entmaxkv] {label} ...")
    start = time.perf_counter()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(every):
            progress(f"[entmaxkv] {label}: still running ({time.perf_counter() - start:.0f} s)")

    thread = threading.Thread(target=heartbeat, name="entmaxkv-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    progress(f"[entmaxkv] {label}: done in {time.perf_counter() - start:.1f} s")
