"""Every input check of the public decode API raises the right error, naming the argument."""

from __future__ import annotations

import pytest
import torch

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.runtime.decode import sparse_decode
from entmaxkv_compile.checks import (
    check_decode_inputs,
    check_page_size,
    check_positions,
    check_scale,
)


def inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 8, generator=gen).to(dtype)
    k = torch.randn(2, 2, 20, 8, generator=gen).to(dtype)
    v = torch.randn(2, 2, 20, 8, generator=gen).to(dtype)
    return dict(q=q, k_cache=k, v_cache=v, seqlens=torch.tensor([20, 3]))


def with_nan(q):
    q = q.clone()
    q[1, 2, 0, 5] = float("nan")
    return q


def with_inf(q):
    q = q.clone()
    q[0, 0, 0, 0] = float("-inf")
    return q


CASES = [
    # (name, change to the inputs, error, words the message must contain)
    ("q 3-d", lambda a: dict(q=a["q"][:, :, 0]), ValueError, "q must have shape"),
    ("q length 2", lambda a: dict(q=a["q"].expand(2, 4, 2, 8)), ValueError, "q must have shape"),
    ("q int", lambda a: dict(q=a["q"].int()), TypeError, "q must have a floating dtype"),
    ("q not a tensor", lambda a: dict(q=a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("k 3-d", lambda a: dict(k_cache=a["k_cache"][0]), ValueError, "k_cache must have shape"),
    ("v shape", lambda a: dict(v_cache=a["v_cache"][:, :, :10]), ValueError, "v_cache must have the shape"),
    ("k int", lambda a: dict(k_cache=a["k_cache"].long()), TypeError, "k_cache must have a floating dtype"),
    ("v int", lambda a: dict(v_cache=a["v_cache"].short()), TypeError, "v_cache must have a floating dtype"),
    ("batch", lambda a: dict(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError, "k_cache must have shape"),
    ("head dim", lambda a: dict(k_cache=a["k_cache"][..., :4], v_cache=a["v_cache"][..., :4]), ValueError, "D=8"),
    ("gqa", lambda a: dict(k_cache=a["k_cache"].repeat(1, 2, 1, 1)[:, :3], v_cache=a["v_cache"].repeat(1, 2, 1, 1)[:, :3]),
     ValueError, "multiple"),
    ("device", lambda a: dict(k_cache=a["k_cache"].to("meta")), ValueError, "device"),
    ("seqlens float", lambda a: dict(seqlens=a["seqlens"].float()), TypeError, "seqlens must have dtype int"),
    ("seqlens shape", lambda a: dict(seqlens=a["seqlens"][:, None]), ValueError, "seqlens must have shape [B]"),
    ("seqlens zero", lambda a: dict(seqlens=torch.tensor([20, 0])), ValueError, "seqlens must lie in [1, 20]"),
    ("seqlens too long", lambda a: dict(seqlens=torch.tensor([21, 3])), ValueError, "seqlens must lie in [1, 20]"),
    ("seqlens device", lambda a: dict(seqlens=a["seqlens"].to("meta")), ValueError, "seqlens must be on device"),
    ("alibi shape", lambda a: dict(alibi_slopes=torch.ones(2)), ValueError, "alibi_slopes must have shape [Hq]"),
    ("alibi int", lambda a: dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "alibi_slopes"),
    ("q nan", lambda a: dict(q=with_nan(a["q"])), ValueError, "q must be finite"),
    ("q inf", lambda a: dict(q=with_inf(a["q"])), ValueError, "q must be finite"),
    ("scale", lambda a: dict(scale=0.0), ValueError, "scale must be a finite float > 0"),
    ("scale type", lambda a: dict(scale="1"), TypeError, "scale must be a float"),
    ("config", lambda a: dict(config="topk"), TypeError, "config must be an EntmaxKVConfig"),
]


@pytest.mark.parametrize("name, change, error, words", CASES, ids=[c[0] for c in CASES])
def test_sparse_decode_rejects_bad_input(name, change, error, words):
    args = inputs()
    args.update(change(args))
    with pytest.raises(error) as info:
        sparse_decode(**args)
    assert words in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_floating_dtype_is_accepted(dtype):
    result = sparse_decode(**inputs(dtype), config=EntmaxKVConfig(page_size=4))
    assert result.out.dtype == dtype


def test_value_checks_are_skippable():
    args = inputs()
    args["q"] = with_nan(args["q"])
    check_decode_inputs(args["q"], args["k_cache"], args["v_cache"], torch.tensor([99, 0]), check_values=False)
    with pytest.raises(ValueError, match="seqlens"):
        check_decode_inputs(args["q"], args["k_cache"], args["v_cache"], torch.tensor([99, 0]))


def test_positions_and_scalars():
    check_positions(torch.tensor([0, 19]), 2, 20, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 19\]"):
        check_positions(torch.tensor([0, 20]), 2, 20, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="positions must lie"):
        check_positions(torch.tensor([-1, 2]), 2, 20, device=torch.device("cpu"))
    check_positions(torch.tensor([-1, 20]), 2, 20, device=torch.device("cpu"), check_values=False)
    with pytest.raises(TypeError, match="positions"):
        check_positions(torch.tensor([0.0, 1.0]), 2, 20, device=torch.device("cpu"))
    assert check_page_size(64) == 64
    for bad in (0, 12, -4):
        with pytest.raises(ValueError, match="page_size must be a positive power of two"):
            check_page_size(bad)
    with pytest.raises(TypeError, match="page_size"):
        check_page_size(True)
    assert check_scale(2) == 2.0
    with pytest.raises(ValueError, match="scale"):
        check_scale(float("inf"))


@pytest.mark.parametrize("selector", ["gaussian", "topk", "certified"])
def test_one_eager_step_validates_its_inputs_once(selector, monkeypatch):
    """sparse_decode checks the decode inputs once; the stages under it (select, attend, certify)
    trust their caller instead of checking the same tensors again."""
    import entmaxkv_compile.checks as checks
    import entmaxkv_compile.runtime.certify.reference as certify_reference
    import entmaxkv_compile.runtime.decode as decode
    import entmaxkv_compile.runtime.select.reference as select_reference

    calls = []

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(decode, "check_decode_inputs")
    counting(checks, "check_decode_inputs")  # what check_attend_inputs and check_step_inputs call
    counting(select_reference, "check_bound_inputs")
    counting(certify_reference, "check_bound_inputs")
    result = sparse_decode(**inputs(), config=EntmaxKVConfig(selector=selector, page_size=4, token_budget=8))
    assert result.out.shape == (2, 4, 1, 8)
    assert calls == ["check_decode_inputs"]
