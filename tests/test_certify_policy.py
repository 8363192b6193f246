"""The certified mode's read-everything fallback (``runtime/certify/policy.py``).

When the bounds clear too few pages, the next steps read every page directly (the dense exact
step) and a later step tries the bounds again; the output equals full entmax throughout, and a
densely read step is certified wherever tau is finite.
"""

import pytest
import torch

from entmaxkv_compile import EntmaxKVConfig
from entmaxkv_compile.metrics import full_entmax_decode
from entmaxkv_compile.runtime.certify.policy import HostFallbackSchedule, certify_policy_update_, dense_rows_for
from entmaxkv_compile.runtime.decoder import Decoder
from entmaxkv_compile.runtime.step import reference_implementation, run_step
from entmaxkv_compile.runtime.stats.reference import KVPageStats


def _flat_cache(seed, batch=2, hq=4, hkv=2, nmax=96, dim=16):
    """Keys with tiny norms: every token is near the maximum score, so the Quest bounds clear
    nothing and a certified step must read every page."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, dim, generator=gen, dtype=torch.float64)
    k = 0.01 * torch.randn(batch, hkv, nmax, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, nmax, dim, generator=gen, dtype=torch.float64)
    return q, k, v


def _planted_cache(seed, batch=2, hq=4, hkv=2, nmax=96, dim=16):
    """A strong span on page 2: the bounds clear most pages."""
    q, k, v = _flat_cache(seed, batch, hq, hkv, nmax, dim)
    group = hq // hkv
    q = q[:, ::group].repeat_interleave(group, 1) + 0.1 * q  # the heads of a group look alike
    k = 20 * k
    k[:, :, 16:24] += 3.0 * q[:, ::group, 0][:, :, None, :]
    return q, k, v


def test_update_counts_down_and_sets_after_a_heavy_step():
    skip = torch.tensor([0, 0, 3, 1], dtype=torch.int32)
    dense = dense_rows_for(skip)
    seqlens = torch.tensor([64, 64, 64, 0])  # 4 pages each (page 16), 2 KV heads -> 8 page reads
    num_selected = torch.tensor([[4, 1], [1, 1], [4, 4], [0, 0]], dtype=torch.int32)
    certify_policy_update_(skip, dense, num_selected, seqlens, page_size=16, num_pages=4,
                           dense_above=0.5, probe_every=8)
    assert skip.tolist() == [7, 0, 2, 0]  # 5/8 > 0.5 -> 7 dense steps; 2/8 -> none; counting down
    never = torch.zeros(4, dtype=torch.int32)
    certify_policy_update_(never, dense_rows_for(never), num_selected * 0 + 4, torch.full((4,), 64),
                           page_size=16, num_pages=4, dense_above=1.0, probe_every=8)
    assert never.tolist() == [0, 0, 0, 0]  # dense_above = 1 disables the fallback


def test_dense_rows_read_every_page_and_are_certified_exactly():
    q, k, v = _planted_cache(1)
    seqlens = torch.tensor([96, 70])
    stats = KVPageStats.from_cache(k, seqlens, 16)
    config = EntmaxKVConfig(selector="certified", page_size=16)
    dense_rows = torch.tensor([True, False])
    result = run_step(reference_implementation(), q, k, v, seqlens, stats.buffers(), config, alpha=1.5,
                      scale=0.25, dense_rows=dense_rows)
    full, _ = full_entmax_decode(q, k, v, seqlens, 1.5, 0.25)
    assert torch.allclose(result.out, full, atol=1e-10)
    assert result.certified.all() and (result.delta_bound == 0).all()
    assert (result.num_selected[0] == 6).all()  # every valid page of the dense row
    assert (result.num_selected[1] < 5).all()  # the other row still skips pages


@pytest.mark.parametrize("make, expect_dense", [(_flat_cache, True), (_planted_cache, False)])
def test_decoder_falls_back_only_when_the_bounds_clear_too_little(make, expect_dense):
    q, k, v = make(2)
    seqlens = torch.tensor([96, 96])
    config = EntmaxKVConfig(selector="certified", page_size=16, certify_probe_every=4)
    decoder = Decoder.for_cache(k, q.shape[1], config)
    decoder.prefill(k, seqlens)
    full, _ = full_entmax_decode(q, k, v, seqlens, 1.5, 0.25)
    skips = []
    for _ in range(6):
        result = decoder.run(q, k, v, seqlens)
        skips.append(decoder.stats.certify_skip.tolist())
        assert result.certified.all() and torch.allclose(result.out, full, atol=1e-10)
    if expect_dense:  # probe, 3 dense steps, probe again, ...
        assert [s[0] for s in skips] == [3, 2, 1, 0, 3, 2]
    else:
        assert all(s == [0, 0] for s in skips)


def test_the_decoders_dense_form_equals_its_certified_step_in_fallback_mode():
    """What a graphed Decoder replays when every sequence is in the fallback (``_dense_step``)
    gives the certified step's results and advances the counter the same way."""
    q, k, v = _flat_cache(3)
    seqlens = torch.tensor([96, 57])
    config = EntmaxKVConfig(selector="certified", page_size=16)
    one, two = (Decoder.for_cache(k, q.shape[1], config) for _ in range(2))
    for decoder in (one, two):
        decoder.prefill(k, seqlens)
        decoder.stats.certify_skip.fill_(5)
    want = one._step(q, k, v, seqlens)
    got = two._step(q, k, v, seqlens, "dense")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(one.stats.certify_skip, two.stats.certify_skip) and two.stats.certify_skip.tolist() == [4, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")
def test_graphed_decoder_replays_the_dense_form_in_fallback_mode_with_the_same_results():
    q, k, v = (x.float().cuda() for x in _flat_cache(4, nmax=1024, dim=64))
    seqlens = torch.tensor([1024, 900], device="cuda")
    config = EntmaxKVConfig(selector="certified", page_size=16, certify_probe_every=4)
    eager = Decoder.for_cache(k, q.shape[1], config, cuda_graph=False)
    graphed = Decoder.for_cache(k, q.shape[1], config)
    for decoder in (eager, graphed):
        decoder.prefill(k, seqlens)
    for _ in range(10):
        want, got = eager.run(q, k, v, seqlens), graphed.run(q, k, v, seqlens)
        torch.cuda.synchronize()
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert got.certified.all()
    assert any(key[-1] == "dense" for key in graphed._graphed.recordings)


def test_a_round_that_adds_no_page_keeps_the_first_decode():
    """When the bounds clear every page outside the selection, the certified round reads nothing
    new: its result is the first decode's (not repeated), exact and certified."""
    q, k, v = _planted_cache(5)
    seqlens = torch.tensor([96, 70])
    stats = KVPageStats.from_cache(k, seqlens, 16)
    impl = reference_implementation()
    kw = dict(alpha=1.5, scale=0.25)
    gaussian = run_step(impl, q, k, v, seqlens, stats.buffers(), EntmaxKVConfig(selector="gaussian", page_size=16), **kw)
    certified = run_step(impl, q, k, v, seqlens, stats.buffers(),
                         EntmaxKVConfig(selector="certified", page_size=16), **kw)
    assert torch.equal(certified.num_selected, gaussian.num_selected)  # nothing added
    assert torch.equal(certified.out, gaussian.out) and torch.equal(certified.tau, gaussian.tau)
    full, _ = full_entmax_decode(q, k, v, seqlens, 1.5, 0.25)
    assert certified.certified.all() and torch.allclose(certified.out, full, atol=1e-10)


def _simulate(schedule: HostFallbackSchedule, probes_heavy, steps: int, lag: int):
    """Run ``steps`` decode steps: the device counter as ``certify_policy_update_`` keeps it, the
    host choosing each variant from news that lands ``lag`` steps after the replay it was copied
    from. Returns ``(variants, probed)``: what the host replayed and whether the device probed."""
    period = schedule.probe_every
    counter = torch.zeros(1, dtype=torch.int32)
    pending = None  # (landing step, copied counter)
    variants, probed = [], []
    for t in range(steps):
        if pending is not None and pending[0] <= t:
            schedule.learn(pending[1])
            pending = None
        variant = schedule.choose()
        dense = torch.ones(1, dtype=torch.bool) if variant == "dense" else dense_rows_for(counter)
        probe = not bool(dense[0])
        heavy = probes_heavy(t)
        read = torch.full((1, 2), 100 if (heavy or not probe) else 1, dtype=torch.int32)
        certify_policy_update_(counter, dense, read, torch.tensor([100 * 16]), page_size=16, num_pages=100,
                               dense_above=0.5, probe_every=period)
        if variant == "step" and pending is None:
            pending = (t + 1 + lag, counter.tolist())
        variants.append(variant)
        probed.append(probe)
    return variants, probed


@pytest.mark.parametrize("lag", [0, 1, 7, 40])
def test_host_schedule_keeps_the_devices_period_whatever_the_lag_of_its_news(lag):
    """Heavy probes every time: once the news has landed, the host replays the dense graph on
    exactly the steps the device reads densely, so the device probes once per period, as on its
    own; news that lags only delays that."""
    period = 8
    variants, probed = _simulate(HostFallbackSchedule(period), lambda t: True, 200, lag)
    settled = lag + 2 * period
    assert all(variants[t] == ("step" if probed[t] else "dense") for t in range(settled, 200))
    probes = [t for t in range(settled, 200) if probed[t]]
    assert all(b - a == period for a, b in zip(probes, probes[1:]))
    assert max(len(run) for run in "".join("d" if v == "dense" else "s" for v in variants).split("s")) <= period - 1


def test_host_schedule_lets_the_device_decide_once_probes_turn_light():
    """The bounds start to clear pages (light probes from step 50): within one period plus the
    news' lag every step is the device's own ("step") and probes, as without the schedule."""
    period, lag = 8, 5
    variants, probed = _simulate(HostFallbackSchedule(period), lambda t: t < 50, 120, lag)
    assert all(v == "step" and p for v, p in zip(variants[50 + period + lag + 1:], probed[50 + period + lag + 1:]))
