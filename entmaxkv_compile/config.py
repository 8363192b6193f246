"""The one configuration object of entmaxkv_compile.

Every front door (the eager API, the torch.compile backend, the offline rewrite and export) takes
an :class:`EntmaxKVConfig`. It is frozen and validated on construction, so a bad value fails where
it is written, with the argument's name, instead of deep inside a kernel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

Selector = Literal["gaussian", "topk", "certified", "dense"]
TauEstimate = Literal["auto", "global", "mixture"]
MomentDtype = Literal["float32", "cache"]
CertifySketch = Literal["off", "int8"]

SELECTORS: tuple[str, ...] = ("gaussian", "topk", "certified", "dense")
TAU_ESTIMATES: tuple[str, ...] = ("auto", "global", "mixture")
MOMENT_DTYPES: tuple[str, ...] = ("float32", "cache")
CERTIFY_SKETCHES: tuple[str, ...] = ("off", "int8")


@dataclass(frozen=True)
class EntmaxKVConfig:
    """How a decode step chooses KV pages and attends over them.

    Attributes:
        selector: ``"dense"`` (default) attends over every page: exact, and on the H200 the fastest
            exact mode (it reads all of K but V only on the support; benchmarks/RESULTS.md);
            ``"certified"`` starts from the gaussian selection and adds pages until the support
            certificate proves the output equals full entmax (exact; faster than dense only where
            its bounds clear pages, e.g. with ``certify_sketch="int8"`` or heavy-tailed keys);
            ``"gaussian"`` estimates the entmax threshold from per-page key means/variances and
            keeps pages whose likely maximum score clears it (approximate and the fastest at long
            context, but its error is unbounded on keys its Gaussian model does not fit, e.g.
            0.8-1.5 relative on iid keys at 128k-1M: choose it knowingly, with ``report_bound``);
            ``"topk"`` keeps the pages with the largest Quest bound within ``token_budget``.
        page_size: tokens per page (a power of two). Page ``p`` is rows ``[p*P, (p+1)*P)``.
        token_budget: tokens the ``topk`` selector may attend to, forced pages (last, sink,
            recent) included. At least one page.
        alpha: the entmax alpha, supported in ``[MIN_ALPHA, inf)`` = ``[1.01, inf)``. ``None``
            means "take it from the model" in the compiler passes and 1.5 in the eager API.
            alpha = 1 is softmax (no exact zeros); in ``(1, 1.01)`` the exponent
            ``beta = 1/(alpha-1)`` exceeds 100 and neither float32 (``p = gap**beta`` turns one ulp of
            the gap into ``beta`` ulps of ``p``) nor the gaussian selector's quadrature is accurate
            there, so those values are rejected instead of answered wrongly.
        max_quantile: per-page quantile of the page's maximum score used by the gaussian
            selector: a page is kept when ``(alpha-1)*(mu_p + z_p*sigma_p) > tau_hat - margin``
            with ``z_p = Phi^-1(max_quantile ** (1/n_p))``.
        margin: slack subtracted from the estimated threshold, in scaled-score units (tau units).
        tau_estimate: ``"global"`` solves one Gaussian with the law-of-total-variance moments of
            all pages, ``"mixture"`` solves the mixture of per-page Gaussians (needed with ALiBi,
            where page means drift with position); ``"auto"`` picks mixture iff ALiBi is present.
        sink_pages: the first pages, always attended (attention sinks).
        recent_pages: the pages before the last one, always attended (a recent window).
        certify_max_rounds: rounds of "add the pages violating the certificate, decode again" in
            certified mode. One round always certifies (see ``step.run_step``); more rounds are
            allowed for experiments and change nothing in exact arithmetic.
        certify_dense_above: in certified mode, a step that had to read more than this fraction
            of a sequence's pages (its bounds cleared too few) makes the sequence's next
            ``certify_probe_every - 1`` steps read every page directly, skipping the selection and
            the bounds (exact either way; see ``runtime/certify/policy.py``). 1.0 never does.
        certify_probe_every: the period of that fallback: one step in this many tries the bounds.
        certify_sketch: ``"int8"`` keeps, beside the page statistics, a per-token int8 copy of K
            (groups of 32 channels, bf16 scales: 136 B per token and KV head at D = 128, 53% of
            an fp16 K row; ``runtime/sketch/``). In certified mode the step then selects the pages
            whose token-level sketch bound exceeds the exact threshold of every token's *lower*
            sketch bound (a floor of the full threshold: no gaussian estimate, no Quest round) and
            reads them at full precision: 1.1-1.7x the pages holding the support on the measured
            families, against
            9-70x without it (benchmarks/RESULTS.md). ``"off"`` (default) keeps none. Supported
            by :class:`~entmaxkv_compile.Decoder` and ``sparse_decode``; the compiled paths refuse
            it.
        min_context: sequences shorter than this many tokens use dense entmax decode.
        moment_dtype: storage of the per-page key means and M2 the gaussian selector reads:
            ``"float32"`` (default, exact Welford) or ``"cache"`` (the K cache's dtype, arithmetic
            still in float32: half the selector's bytes for fp16/bf16 caches, at a rounding error
            of a few ulps of the cache dtype per page, which only affects which pages are chosen,
            never the exactness of the attention over them or of the certificate; an M2 past
            float16's range, from one outlier token, is stored as its largest value, not +inf).
        report_bound: for the approximate selectors (``gaussian``, ``topk``), also compute the
            support certificate and the dropped-mass bound ``delta_bound`` of the selection. It
            costs one read of kmin/kmax for every page per step (as much as the selection
            itself), so it is off by default: the step then reports ``certified=False`` and the
            trivial bound ``delta_bound=1``. ``certified`` always computes it; ``dense`` needs no
            bound (every page is read: certified wherever tau is finite). With
            ``certify_sketch="int8"`` the bound is also taken token by token from the key
            sketch (``sketch_delta_bound``), far tighter than the page-level one.
    """

    selector: Selector = "dense"
    page_size: int = 16
    token_budget: int = 4096
    alpha: float | None = None
    max_quantile: float = 0.99
    margin: float = 0.0
    tau_estimate: TauEstimate = "auto"
    sink_pages: int = 0
    recent_pages: int = 0
    certify_max_rounds: int = 1
    certify_dense_above: float = 0.5
    certify_probe_every: int = 32
    certify_sketch: CertifySketch = "off"
    min_context: int = 0
    moment_dtype: MomentDtype = "float32"
    report_bound: bool = False

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        _check_int("page_size", self.page_size, minimum=1)
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        _check_int("token_budget", self.token_budget, minimum=1)
        if self.token_budget < self.page_size:
            raise ValueError(
                f"token_budget must hold at least one page ({self.page_size} tokens), "
                f"got {self.token_budget}"
            )
        if self.alpha is not None:
            check_alpha(self.alpha)
        _check_real("max_quantile", self.max_quantile)
        if not (0.0 < float(self.max_quantile) < 1.0):
            raise ValueError(f"max_quantile must lie in (0, 1), got {self.max_quantile}")
        _check_real("margin", self.margin)
        if not _finite(self.margin):
            raise ValueError(f"margin must be a finite float, got {self.margin}")
        if self.tau_estimate not in TAU_ESTIMATES:
            raise ValueError(f"tau_estimate must be one of {TAU_ESTIMATES}, got {self.tau_estimate!r}")
        _check_int("sink_pages", self.sink_pages, minimum=0)
        _check_int("recent_pages", self.recent_pages, minimum=0)
        _check_int("certify_max_rounds", self.certify_max_rounds, minimum=1)
        _check_real("certify_dense_above", self.certify_dense_above)
        if not (0.0 <= float(self.certify_dense_above) <= 1.0):
            raise ValueError(f"certify_dense_above must lie in [0, 1], got {self.certify_dense_above}")
        _check_int("certify_probe_every", self.certify_probe_every, minimum=1)
        if self.certify_sketch not in CERTIFY_SKETCHES:
            raise ValueError(f"certify_sketch must be one of {CERTIFY_SKETCHES}, got {self.certify_sketch!r}")
        _check_int("min_context", self.min_context, minimum=0)
        if self.moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment_dtype must be one of {MOMENT_DTYPES}, got {self.moment_dtype!r}")
        if not isinstance(self.report_bound, bool):
            raise TypeError(f"report_bound must be a bool, got {type(self.report_bound).__name__}")

    @property
    def keeps_sketch(self) -> bool:
        """Whether a step with this config keeps the int8 key sketch: the certified selector, or
        an approximate one that reports its bound, with ``certify_sketch="int8"``."""
        reports = self.report_bound and self.selector in ("gaussian", "topk")
        return self.certify_sketch == "int8" and (self.selector == "certified" or reports)

    def check_compiled(self) -> "EntmaxKVConfig":
        """Raise for the options the compiled step (backend, offline rewrite, exports) does not
        implement yet, instead of ignoring them; return ``self``."""
        if self.certify_sketch != "off":
            raise ValueError(f"certify_sketch={self.certify_sketch!r} is supported by Decoder and sparse_decode "
                             "only; the compiled step does not keep a key sketch yet (use 'off')")
        return self

    @property
    def budget_pages(self) -> int:
        """Pages the top-k selector may attend to (forced pages included)."""
        return self.token_budget // self.page_size

    def resolved_alpha(self, default: float = 1.5) -> float:
        """The alpha to use: the configured one, else ``default``."""
        return float(self.alpha) if self.alpha is not None else float(default)

    def replace(self, **changes: Any) -> "EntmaxKVConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "EntmaxKVConfig":
        """Build a config from a ``torch.compile(options=...)``-style mapping.

        Unknown keys raise a ``ValueError`` naming them and the known ones.
        """
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown EntmaxKVConfig option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


#: The smallest supported entmax alpha (beta = 1/(alpha-1) <= 100); see EntmaxKVConfig.alpha.
MIN_ALPHA = 1.01


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """Validate an entmax alpha: a finite real number ``>= MIN_ALPHA`` (1.01).

    ``alpha <= 1`` is not entmax; ``1 < alpha < 1.01`` is rejected because the solve and the
    gaussian estimate lose their accuracy there (see ``EntmaxKVConfig.alpha``).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name} must be a float > 1, got {type(alpha).__name__}")
    if not _finite(alpha) or alpha <= 1.0:
        raise ValueError(
            f"{name} must be > 1 (alpha = 1 is softmax, which has no exact zeros), got {alpha}"
        )
    if alpha < MIN_ALPHA:
        raise ValueError(
            f"{name} must be >= {MIN_ALPHA}, got {alpha}: below it beta = 1/(alpha-1) > 100 and "
            "the threshold solve and the gaussian estimate are not accurate (use softmax, or "
            f"alpha >= {MIN_ALPHA})"
        )
    return float(alpha)


def _check_real(name: str, value: Any) -> None:
    """``value`` must be a Python int or float (not a bool, a string or None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")


def _finite(x: Any) -> bool:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return False
    return x == x and x not in (float("inf"), float("-inf"))


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
