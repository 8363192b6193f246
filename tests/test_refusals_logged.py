"""Nothing falls back silently: every refused site is logged with its reason; prefill bookkeeping
is reported as bookkeeping (never as refused) and logs nothing."""

from __future__ import annotations

import logging

import pytest
import torch

from entmaxkv_compile.compiler.explain import recording
from examples.zoo import ZOO, gpt_fast

BACKEND_LOG = "entmaxkv_compile.compiler.backend"


def _logged_refusals(records):
    return [r.getMessage() for r in records if "not rewritten" in r.getMessage() and r.levelno == logging.WARNING]


@pytest.mark.parametrize("name", ["gpt_fast_entmax15", "window_sink", "head_alpha", "rolling_buffer"])
def test_each_refused_site_is_logged_once_per_graph_and_bookkeeping_is_not(name, caplog):
    entry = ZOO[name]
    model = entry.build()
    prompt = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="entmaxkv", options={"compiler": "eager", "selector": "certified"})
    with recording() as report, caplog.at_level(logging.WARNING, logger=BACKEND_LOG):
        entry.generate(model, prompt, 16, compiled)
    prefill, decode = report.graphs
    assert {s.status for s in prefill.sites} == {entry.prefill_status}
    if entry.prefill_status == "bookkeeping":
        assert all(s.reason.startswith("query length is not 1") for s in prefill.sites)
    refused = [s for s in report.sites if s.status == "refused"]
    logged = _logged_refusals(caplog.records)
    assert len(logged) == len(refused)
    for site, message in zip(refused, logged):
        assert site.where in message and site.reason in message


def test_offline_rewrite_logs_the_sites_it_refuses_while_rewriting_the_others(caplog):
    from entmaxkv_compile.compiler.rewrite import rewrite
    from entmaxkv_compile.config import EntmaxKVConfig

    model = gpt_fast.build(gpt_fast.ModelArgs(n_layer=2, head_alphas=(1.5,) * 4))
    with torch.no_grad():
        model.layers[1].attention.weights.alpha.copy_(torch.tensor([1.5, 2.0, 1.5, 1.25]))
        model(torch.randint(0, 96, (2, 9)), torch.arange(9))
    args = (torch.randint(0, 96, (2, 1)), torch.tensor([9]))
    with caplog.at_level(logging.WARNING, logger="entmaxkv_compile.compiler.rewrite"):
        result = rewrite(model, args, EntmaxKVConfig(selector="certified"))
    assert [s.status for s in result.report.sites] == ["rewritten", "refused"]
    [message] = _logged_refusals(caplog.records)
    assert "layers.1.attention" in message and "per-head alpha: decode_step takes one alpha" in message
