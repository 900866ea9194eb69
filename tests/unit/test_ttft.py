"""The router's TTFT model (routing.ttft): fitted online from observed first tokens."""

from __future__ import annotations

import random

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
