"""The router's TTFT model (routing.ttft): fitted online from observed first tokens."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshserve.router.routing.ttft import Fit, Forecaster, Work, ape, predict


@settings(max_examples=50, deadline=None)
@given(
    base=st.floats(0.001, 0.1),
    rate=st.floats(1_000, 50_000),
    step=st.floats(0.0, 0.01),
    seed=st.integers(0, 1000),
)
def test_the_fit_recovers_a_linear_device(base: float, rate: float, step: float, seed: int) -> None:
    rng = random.Random(seed)
    fit = Fit()
    for _ in range(300):
        x, y = rng.uniform(0, 4000), rng.randint(0, 32)
        fit.observe(x, y, base + x / rate + y * step)
    for x, y in ((100, 0), (2000, 8), (3500, 30)):
        want = base + x / rate + y * step
        assert ape(fit.predict(x, y), want) < 0.02


def test_without_spread_in_prompt_work_the_rate_explains_the_mean() -> None:
    fit = Fit()
    for _ in range(100):
        fit.observe(1152, 0, 0.08)  # every prompt alike, nothing queued
    assert ape(fit.predict(1152, 0), 0.08) < 0.01


def test_garbage_observations_are_ignored() -> None:
    fit = Fit()
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        fit.observe(100, 1, bad)
    assert fit.n == 0


def test_the_forecaster_queues_work_until_the_first_token_and_scores_it() -> None:
    f = Forecaster()
    w = f.work("a", tokens=1000, cached_tokens=600, host_tokens=0, running=2)
    assert w.uncached_tokens == 400 and w.queued_tokens == 0
    f.sent("a", w, 1000)
    w2 = f.work("a", tokens=500, cached_tokens=0, host_tokens=0, running=2)
    assert w2.queued_tokens == 400  # the first stream's prefill is ahead of it
    predicted = predict(f.fit("m", "cpu"), w)
    err = f.first_token("m", "cpu", "a", w, predicted, predicted * 2)
    assert err == 0.5 and f.queued["a"] == 0
    # a residency wait says nothing of prefill rates: not learnt
    asleep = Work(uncached_tokens=10, residency_s=3.0)
    f.first_token("m", "cpu", "a", asleep, 3.0, 3.1)
    assert f.fit("m", "cpu").n == 1


@settings(max_examples=100, deadline=None)
@given(
    base=st.floats(0.0, 0.1),
    rate=st.floats(100, 50_000),
    step=st.floats(0.0, 0.05),
    tokens=st.integers(0, 8_000),
    queued=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4_000)), max_size=6),
    cands=st.lists(
        st.tuples(
            st.integers(0, 3),  # address
            st.integers(0, 8_000),  # cached tokens
            st.integers(0, 2_000),  # of them in host RAM
            st.integers(0, 40),  # running
            st.integers(0, 20),  # waiting in the engine
            st.floats(0.0, 5.0),  # residency (an asleep replica's restore)
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_the_batch_prediction_equals_one_work_at_a_time(
    base: float,
    rate: float,
    step: float,
    tokens: int,
    queued: list[tuple[int, int]],
    cands: list[tuple[int, int, int, int, int, float]],
) -> None:
    """`Forecaster.predict_many` (the hot path's arithmetic) is `predict` of `work` for every
    candidate: the two are written apart for speed, and must not drift."""
    f = Forecaster()
    fit = Fit(base_s=base, prefill_tokens_per_s=rate, step_cost_s=step)
    for address, t in queued:  # this router's unstarted streams
        f.sent(f"a{address}", f.work(f"a{address}", t, 0, 0, 0), t)
    many = f.predict_many(
        fit,
        [f"a{a}" for a, *_ in cands],
        tokens,
        [c for _a, c, *_ in cands],
        [h for _a, _c, h, *_ in cands],
        [n for *_, n, _w, _r in cands],
        [w for *_, w, _r in cands],
        [r for *_, r in cands],
    )
    one = [
        predict(fit, f.work(f"a{a}", tokens, c, h, n, waiting_elsewhere=w, residency_s=r))
        for a, c, h, n, w, r in cands
    ]
    assert many == [pytest.approx(x, rel=1e-9, abs=1e-12) for x in one]
