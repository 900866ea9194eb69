"""Time to first token, predicted per candidate replica (pure): the router's cost model.

For a prompt of ``tokens`` tokens of which a replica holds the first ``cached`` (its prefix index
`Match`), the wait for the first token there is

    ttft = residency + base + (queued + uncached) / prefill_rate + running * step_cost
           + host_tokens / host_fetch_rate

- ``residency``: 0 when its weights are on the device; else the time to bring them back (the
  restore time its agent measured for that tier, or the model's bytes over the tier's
  bandwidth: its ``restore_seconds``), since a request sent to an asleep replica waits for the
  restore (the router weighs waking one against queueing: core/wakes.py);
- ``queued``: prefill tokens ahead of it there (this router's streams sent but not yet started,
  plus the engine's own waiting streams at the mean prompt length);
- ``uncached``: this prompt's tokens past its cached prefix; ``host_tokens``: the cached ones that
  sit in host RAM and must be copied back first;
- ``running``: streams it decodes, each of which stretches the steps that carry the prefill.

``base``, ``prefill_rate`` and ``step_cost`` are fitted online per (model, device kind) from
observed TTFTs (`Fit`: exponentially weighted least squares over the two work features), so the
model follows the hardware it runs on; until enough observations arrive it uses the defaults.
Each observation also scores the prediction made for that request (absolute percentage error,
exported by the router as a metric).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

DECAY = 0.99  # per observation: the fit remembers about the last 100
MIN_OBSERVATIONS = 16
RIDGE = 1e-9


@dataclass
class Fit:
    """ttft ≈ base + prefill_tokens / rate + running x step_cost, fitted online."""

    base_s: float = 0.02
    prefill_tokens_per_s: float = 8_000.0
    step_cost_s: float = 0.0
    n: int = 0
    _sums: list[float] = field(default_factory=lambda: [0.0] * 9)  # w, x, y, t, xx, xy, yy, xt, yt

    def predict(self, prefill_tokens: float, running: float) -> float:
        return self.base_s + prefill_tokens / self.prefill_tokens_per_s + running * self.step_cost_s

    def observe(self, prefill_tokens: float, running: float, ttft_s: float) -> None:
        """One request's observed TTFT with the work it found (tokens to prefill before and
        including its own, streams decoding)."""
        if not (math.isfinite(ttft_s) and ttft_s > 0):
            return
        s = self._sums
        x, y, t = prefill_tokens, running, ttft_s
        for i in range(9):
            s[i] *= DECAY
        for i, v in enumerate((1.0, x, y, t, x * x, x * y, y * y, x * t, y * t)):
            s[i] += v
        self.n += 1
        if self.n >= MIN_OBSERVATIONS:
            self._solve()

    def _solve(self) -> None:
        w, x, y, t, xx, xy, yy, xt, yt = self._sums
        # Centred normal equations of t = b + p x + q y (p = 1/rate, q = step cost).
        mx, my, mt = x / w, y / w, t / w
        sxx, sxy, syy = xx / w - mx * mx, xy / w - mx * my, yy / w - my * my
        sxt, syt = xt / w - mx * mt, yt / w - my * mt
        sxx, syy = sxx + RIDGE, syy + RIDGE
        det = sxx * syy - sxy * sxy
        if sxx < 1.0 or det <= 0:  # no spread in prompt work yet: base and rate are not
            # separable, so the base stays and the rate explains the rest
            q = max(0.0, syt / syy) if syy > 1e-6 else self.step_cost_s
            rest = mt - self.base_s - q * my
            p = rest / mx if mx > 0 and rest > 0 else 1 / self.prefill_tokens_per_s
            self.prefill_tokens_per_s, self.step_cost_s = 1 / p, q
            return
        p = (sxt * syy - syt * sxy) / det
        q = (syt * sxx - sxt * sxy) / det
        if p <= 0:  # noise: keep the last rate
            p = 1 / self.prefill_tokens_per_s
        q = max(0.0, q)
        self.prefill_tokens_per_s = 1 / p
        self.step_cost_s = q
        self.base_s = max(0.0, mt - p * mx - q * my)


@dataclass(frozen=True)
class Work:
    """What a candidate would do before this prompt's first token (see the module docstring)."""

    queued_tokens: float = 0.0
    uncached_tokens: float = 0.0
    host_tokens: float = 0.0
    running: float = 0.0
    residency_s: float = 0.0

    @property
    def prefill_tokens(self) -> float:
        return self.queued_tokens + self.uncached_tokens


HOST_FETCH_TOKENS_PER_S = 200_000.0  # KV copied back from host RAM: far faster than prefill


def predict(fit: Fit, work: Work) -> float:
    return (
        work.residency_s
        + fit.predict(work.prefill_tokens, work.running)
        + work.host_tokens / HOST_FETCH_TOKENS_PER_S
    )


def ape(predicted: float, observed: float) -> float:
    """Absolute percentage error of one prediction."""
    return abs(predicted - observed) / observed if observed > 0 else 0.0


@dataclass
class Forecaster:
    """The router's side of the model: the fits per (model, device kind), and per replica the
    prefill work it was sent whose first token has not come back yet (``queued``)."""

    fits: dict[tuple[str, str], Fit] = field(default_factory=dict)
    queued: dict[str, float] = field(default_factory=dict)  # address → prefill tokens
    queued_n: dict[str, int] = field(default_factory=dict)  # address → those streams
    mean_prompt: float = 512.0  # tokens, exponentially weighted (prices others' queued streams)
    errors: list[float] = field(default_factory=list)  # recent absolute percentage errors

    def fit(self, model: str, kind: str) -> Fit:
        f = self.fits.get((model, kind))
        if f is None:
            f = self.fits[(model, kind)] = Fit()
        return f

    def work(
        self,
        address: str,
        tokens: int,
        cached_tokens: int,
        host_tokens: int,
        running: int,
        waiting_elsewhere: int = 0,
        residency_s: float = 0.0,
    ) -> Work:
        """A candidate's `Work` for a prompt of ``tokens`` of which it holds ``cached_tokens``
        (``host_tokens`` of them in host RAM); ``waiting_elsewhere``: streams its engine queues
        (its published figure: this router's unstarted ones are taken out, they are counted by
        their tokens)."""
        others = max(0, waiting_elsewhere - self.queued_n.get(address, 0))
        return Work(
            queued_tokens=self.queued.get(address, 0.0) + others * self.mean_prompt,
            uncached_tokens=max(0, tokens - cached_tokens),
            host_tokens=host_tokens,
            running=running,
            residency_s=residency_s,
        )

    def predict_many(
        self,
        fit: Fit,
        addresses: Sequence[str],
        tokens: int,
        cached: Sequence[int],
        host: Sequence[int],
        running: Sequence[int],
        waiting_elsewhere: Sequence[int],
        residency_s: Sequence[float],
    ) -> list[float]:
        """`predict` of `work` for many candidates at once (plain arithmetic: the router runs
        it for every candidate of every request)."""
        queued, own, mean = self.queued, self.queued_n, self.mean_prompt
        base, per_token, per_stream = fit.base_s, 1 / fit.prefill_tokens_per_s, fit.step_cost_s
        fetch = 1 / HOST_FETCH_TOKENS_PER_S
        return [
            r + base
            + (queued.get(a, 0.0) + max(0, w - own.get(a, 0)) * mean + max(0, tokens - c))
            * per_token
            + n * per_stream + h * fetch
            for a, c, h, n, w, r in zip(
                addresses, cached, host, running, waiting_elsewhere, residency_s, strict=True
            )
        ]  # fmt: skip

    def sent(self, address: str, work: Work, tokens: int) -> None:
        self.queued[address] = self.queued.get(address, 0.0) + work.uncached_tokens
        self.queued_n[address] = self.queued_n.get(address, 0) + 1
        self.mean_prompt += 0.05 * (tokens - self.mean_prompt)

    def first_token(
        self, model: str, kind: str, address: str, work: Work, predicted: float, observed: float
    ) -> float:
        """The stream's first token came after ``observed`` seconds: its prefill leaves the
        queue, the fit learns, and the prediction's error is returned (and kept)."""
        self._dequeue(address, work)
        if work.residency_s == 0:  # a restore's wait says nothing about prefill rates
            self.fit(model, kind).observe(work.prefill_tokens, work.running, observed)
        e = ape(predicted, observed)
        self.errors.append(e)
        del self.errors[:-1000]
        return e

    def abandoned(self, address: str, work: Work) -> None:
        """A stream that ended before its first token (failed, cancelled)."""
        self._dequeue(address, work)

    def _dequeue(self, address: str, work: Work) -> None:
        self.queued[address] = max(0.0, self.queued.get(address, 0.0) - work.uncached_tokens)
        self.queued_n[address] = max(0, self.queued_n.get(address, 0) - 1)
