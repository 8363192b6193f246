"""EntmaxKVConfig: defaults, validation with named arguments, from_options."""

import pytest

from entmaxkv_compile import EntmaxKVConfig


def test_defaults_are_documented_values():
    cfg = EntmaxKVConfig()
    assert (cfg.selector, cfg.page_size, cfg.token_budget, cfg.alpha) == ("dense", 16, 4096, None)
    assert cfg.budget_pages == 256 and cfg.resolved_alpha() == 1.5
    assert EntmaxKVConfig(alpha=2).resolved_alpha() == 2.0


def test_frozen_and_replace_revalidates():
    cfg = EntmaxKVConfig()
    with pytest.raises(Exception):
        cfg.page_size = 32  # type: ignore[misc]
    assert cfg.replace(page_size=32).page_size == 32
    with pytest.raises(ValueError, match="page_size"):
        cfg.replace(page_size=24)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(selector="quest"), ValueError, "selector must be one of"),
        (dict(page_size=12), ValueError, "page_size must be a power of two"),
        (dict(page_size=0), ValueError, "page_size must be >= 1"),
        (dict(page_size=16.0), TypeError, "page_size must be an int"),
        (dict(token_budget=8), ValueError, "token_budget must hold at least one page"),
        (dict(alpha=1.0), ValueError, "alpha must be > 1"),
        (dict(alpha=-3), ValueError, "alpha must be > 1"),
        (dict(max_quantile=1.0), ValueError, "max_quantile"),
        (dict(margin=float("inf")), ValueError, "margin"),
        (dict(tau_estimate="median"), ValueError, "tau_estimate"),
        (dict(sink_pages=-1), ValueError, "sink_pages"),
        (dict(certify_max_rounds=True), TypeError, "certify_max_rounds"),
        (dict(min_context=-5), ValueError, "min_context"),
    ],
)
def test_bad_values_name_the_argument(kwargs, err, match):
    with pytest.raises(err, match=match):
        EntmaxKVConfig(**kwargs)


def test_from_options():
    cfg = EntmaxKVConfig.from_options({"selector": "topk", "token_budget": 512})
    assert cfg.selector == "topk" and cfg.token_budget == 512
    assert EntmaxKVConfig.from_options(None) == EntmaxKVConfig()
    with pytest.raises(ValueError, match="unknown EntmaxKVConfig option.*'budget'"):
        EntmaxKVConfig.from_options({"budget": 3})
