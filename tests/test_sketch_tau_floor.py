"""The sketch's floor of the exact threshold (``sketch_tau_floor``): never above the float64
threshold of the true scores over every valid token, close to it, and silent (``-inf``) where
a key is not finite."""

import math

import pytest
import torch

from entmaxkv_compile.math.reference import entmax_threshold
from entmaxkv_compile.runtime.sketch.reference import KeySketch, sketch_tau_floor
from tests.test_sketch import FAMILIES, sketch_case

ALPHAS = (1.25, 4 / 3, 1.5, 1.75, 2.0)


def exact_tau(q, k, seqlens, alpha, scale, slopes=None):
    """float64 ``[B, Hq]``: the threshold of full entmax over each sequence's valid tokens."""
    batch, hq, _, dim = q.shape
    hkv, nmax = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    s = scale * torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), kk)
    length = seqlens.to(torch.int64)
    if slopes is not None:
        offs = torch.arange(nmax)[None, :] - (length[:, None] - 1)
        s = s + slopes.double()[None, :, None] * offs[:, None, :].double()
    valid = (torch.arange(nmax)[None, :] < length[:, None])[:, None, :].expand_as(s)
    return entmax_threshold(s, alpha, mask=valid)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dim", [48, 64])
def test_floor_never_above_the_exact_threshold(family, alpha, dim):
    q, k, seqlens, _ = sketch_case(family, seed=int(alpha * 100) + dim, dim=dim)
    scale = 1 / math.sqrt(dim)
    sketch = KeySketch.from_cache(k, seqlens)
    floor = sketch_tau_floor(q, *sketch.buffers(), seqlens, alpha=alpha, scale=scale)
    exact = exact_tau(q, k, seqlens, alpha, scale)
    assert floor.dtype == torch.float32 and floor.shape == exact.shape
    assert bool((floor.double() <= exact).all())


@pytest.mark.parametrize("alibi", [False, True])
def test_floor_with_alibi_gqa_and_ragged_lengths(alibi):
    q, k, seqlens, slopes = sketch_case("planted", seed=3, batch=3, hq=12, hkv=3, nmax=70, dim=80,
                                        alibi=alibi)
    scale = 1 / math.sqrt(80)
    sketch = KeySketch.from_cache(k, seqlens)
    floor = sketch_tau_floor(q, *sketch.buffers(), seqlens, alpha=1.5, scale=scale, alibi_slopes=slopes)
    assert bool((floor.double() <= exact_tau(q, k, seqlens, 1.5, scale, slopes)).all())


def test_floor_is_close_to_the_exact_threshold():
    """On iid keys the int8 slack moves each score by ~1% of its spread: the floor must be within
    a small fraction of tau's range (the gap between max z - 1 and max z), or it clears nothing."""
    q, k, seqlens, _ = sketch_case("iid", seed=7, batch=1, nmax=512, dim=64)
    scale = 1 / math.sqrt(64)
    sketch = KeySketch.from_cache(k, seqlens)
    floor = sketch_tau_floor(q, *sketch.buffers(), seqlens, alpha=1.5, scale=scale).double()
    exact = exact_tau(q, k, seqlens, 1.5, scale)
    assert bool(((exact - floor) < 0.05).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_key_silences_only_its_sequence(bad):
    q, k, seqlens, _ = sketch_case("iid", seed=5, batch=2, nmax=40, dim=48)
    k[1, 0, 3, 7] = bad
    sketch = KeySketch.from_cache(k, seqlens)
    floor = sketch_tau_floor(q, *sketch.buffers(), seqlens, alpha=1.5, scale=0.2)
    group = q.shape[1] // k.shape[1]
    assert bool((floor[1, :group] == float("-inf")).all())
    assert bool(torch.isfinite(floor[0]).all())


def test_nothing_to_attend_gives_no_floor():
    q, k, seqlens, _ = sketch_case("iid", seed=2, batch=2, nmax=40, dim=48)
    sketch = KeySketch.from_cache(k, seqlens)
    seqlens[1] = 0
    floor = sketch_tau_floor(q, *sketch.buffers(), seqlens, alpha=1.5, scale=0.2)
    assert bool((floor[1] == float("-inf")).all()) and bool(torch.isfinite(floor[0]).all())
