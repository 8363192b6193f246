"""Attention-weight functions of the zoo: the entmax spellings users write, and softmax.

Each takes scores ``[..., N]`` and normalizes over the last axis. ``WEIGHTS[name]`` returns
``(fn, alpha)`` where ``alpha`` is None for softmax.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

import entmaxkv_compile

try:  # the PyPI entmax package is optional (the GPU image lacks it); its spellings need it
    import entmax
except ImportError:  # pragma: no cover - exercised only where entmax is absent
    entmax = None


def handwritten_entmax15(scores: torch.Tensor) -> torch.Tensor:
    """1.5-entmax written out by hand (exact sort-based threshold), as a user might."""
    z = scores / 2
    z = z - z.amax(dim=-1, keepdim=True)
    ranked, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    mean = ranked.cumsum(-1) / k
    mean_sq = (ranked * ranked).cumsum(-1) / k
    spread = k * (mean_sq - mean * mean)
    delta = torch.clamp((1 - spread) / k, min=0)
    tau = mean - torch.sqrt(delta)
    support = (tau <= ranked).sum(dim=-1, keepdim=True)
    tau_star = tau.gather(-1, support - 1)
    return torch.relu(z - tau_star) ** 2


def not_quite_entmax(scores: torch.Tensor) -> torch.Tensor:
    """Looks like an entmax tail but uses a fixed threshold below the row max: must NOT be rewritten."""
    z = scores / 2
    tail = torch.clamp(z - (z.amax(dim=-1, keepdim=True) - 0.5), min=0) ** 2
    return tail / tail.sum(dim=-1, keepdim=True)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.float(), dim=-1).to(scores.dtype)


WEIGHTS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Optional[float]]] = {
    "own_entmax_2": (lambda s: entmaxkv_compile.entmax(s, alpha=2.0, dim=-1), 2.0),
    "own_entmax15": (lambda s: entmaxkv_compile.entmax(s, alpha=1.5, dim=-1), 1.5),
    "handwritten": (handwritten_entmax15, 1.5),
    "not_quite": (not_quite_entmax, None),
    "softmax": (_softmax, None),
}

class PerHeadAlpha(torch.nn.Module):
    """A learnable alpha per head (adaptively sparse attention), passed to ``entmax.entmax_bisect``
    as a ``[1, H, 1, 1]`` tensor."""

    def __init__(self, alphas: list[float]) -> None:
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor(alphas))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return entmax.entmax_bisect(scores, alpha=self.alpha.view(1, -1, 1, 1), dim=-1, n_iter=60)


if entmax is not None:
    _ENTMAX15 = entmax.Entmax15(dim=-1)
    _BISECT_43 = entmax.EntmaxBisect(alpha=4 / 3, dim=-1, n_iter=60)
    WEIGHTS.update({
        "entmax15": (lambda s: entmax.entmax15(s, dim=-1), 1.5),
        "entmax15_module": (lambda s: _ENTMAX15(s), 1.5),
        "sparsemax": (lambda s: entmax.sparsemax(s, dim=-1), 2.0),
        "bisect_1.25": (lambda s: entmax.entmax_bisect(s, alpha=1.25, dim=-1, n_iter=60), 1.25),
        "bisect_4/3_module": (lambda s: _BISECT_43(s), 4 / 3),
    })
