"""``explain``: what the ``"entmaxkv"`` backend does to each attention site of a model, and why.

>>> report = explain(model, token, input_pos)          # doctest: +SKIP
>>> print(report)                                        # doctest: +SKIP
graph   phase    where                kind     alpha   status      reason
───────────────────────────────────────────────────────────────────────────────────────────────────
    0   decode   layers.0.attention   entmax     1.5   rewritten   decode step -> page_stats_append + decode_step

``explain`` runs the model once through the backend (rewritten graphs run eagerly, no Inductor),
so the call has the model's usual side effects (its cache is written). To see what a longer run
did (e.g. a prefill and the decode steps of ``generate()``), wrap it in :func:`recording`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from ..tables import render_table
from .passes.analyze import Plan, Site

_COLUMNS = ("graph", "phase", "where", "kind", "alpha", "status", "reason")


@dataclass
class GraphRecord:
    """One graph the backend compiled: its sites and its code before and after the rewrite."""

    sites: list[Site]
    code_before: str
    code_after: str

    @property
    def changed(self) -> bool:
        return self.code_before != self.code_after


@dataclass
class ExplainReport:
    """Every attention site of every graph compiled while recording."""

    graphs: list[GraphRecord] = field(default_factory=list)

    @property
    def sites(self) -> list[Site]:
        return [site for graph in self.graphs for site in graph.sites]

    def rows(self) -> list[tuple[str, ...]]:
        rows = []
        for index, graph in enumerate(self.graphs):
            for s in graph.sites:
                alpha = "-" if s.alpha is None else f"{s.alpha:.4g}"
                rows.append((str(index), s.phase or "-", s.where, s.kind, alpha, s.status, s.reason))
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return "no attention site found (no graph was compiled, or it has no attention)"
        return render_table(_COLUMNS, rows, right=("graph", "alpha"))


@contextlib.contextmanager
def recording() -> Iterator[ExplainReport]:
    """Collect an :class:`ExplainReport` of every graph the backend compiles inside the block."""
    from . import backend  # imported on use: it installs the capture polyfills

    report = ExplainReport()

    def observe(plan: Plan, before: str, after: str) -> None:
        report.graphs.append(GraphRecord(list(plan.sites), before, after))

    backend._OBSERVERS.append(observe)
    try:
        yield report
    finally:
        backend._OBSERVERS.remove(observe)


def explain(model: Callable[..., Any], *args: Any, options: Optional[Mapping[str, Any]] = None,
            **kwargs: Any) -> ExplainReport:
    """Run ``model(*args, **kwargs)`` once through the backend and report every attention site.

    ``options`` are the backend's (see :mod:`entmaxkv_compile.backend`); ``"compiler"`` is forced
    to ``"eager"`` so nothing is code-generated. Shapes are static (``dynamic=False``): the report
    describes this call, and an earlier compilation of the same code with other shapes must not
    turn its sizes symbolic (Dynamo's automatic dynamic shapes), which changes what is proved.
    """
    from . import backend

    if not callable(model):
        raise TypeError(f"model must be callable (a module or function), got {type(model).__name__}")
    opts = {**dict(options or {}), "compiler": "eager"}
    compiled = torch.compile(model, backend=functools.partial(backend.entmaxkv_backend, options=opts), dynamic=False)
    with recording() as report, torch.no_grad():
        compiled(*args, **kwargs)
    return report
