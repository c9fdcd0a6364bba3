import itertools
import math
import random
import statistics

import pytest

from worker.backoff import (
    BackoffPolicy,
    DelayFunction,
    constant,
    delay_seconds,
    exponential,
    exponential_jitter,
    jitter,
    linear,
)

SAMPLES = 20_000
BIG_CAP = 1e9
ALL_FUNCTIONS = [constant, jitter, linear, exponential, exponential_jitter]


def _curve(t: float) -> float:
    """Polly's DecorrelatedJitterBackoffV2 curve, written out independently of the module."""
    return math.pow(2.0, t) * math.tanh(math.sqrt(4.0 * t))


def _samples(attempt: int, base: float = 1.0, cap: float = BIG_CAP, seed: int = 7) -> list[float]:
    rng = random.Random(seed + attempt)
    return [exponential_jitter(attempt, base, cap, rng) for _ in range(SAMPLES)]


def _polly_stateful(attempts: int, base: float, rng: random.Random) -> list[float]:
    """One message's delays under Polly's original stateful algorithm (prev carried over)."""
    prev, delays = 0.0, []
    for attempt in range(attempts):
        nxt = _curve(attempt + rng.random())
        delays.append((nxt - prev) / 1.4 * base)
        prev = nxt
    return delays


def test_constant_is_base_and_capped() -> None:
    rng = random.Random(0)
    assert [constant(a, 2.0, 60.0, rng) for a in range(5)] == [2.0] * 5
    assert constant(0, 2.0, 1.5, rng) == 1.5


def test_linear_exact_and_capped() -> None:
    rng = random.Random(0)
    assert [linear(a, 2.0, 60.0, rng) for a in range(5)] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert [linear(a, 2.0, 7.0, rng) for a in range(5)] == [2.0, 4.0, 6.0, 7.0, 7.0]
    assert linear(10**400, 2.0, 7.0, rng) == 7.0  # no int-to-float overflow


def test_exponential_exact_and_capped() -> None:
    rng = random.Random(0)
    assert [exponential(a, 2.0, 60.0, rng) for a in range(5)] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert [exponential(a, 2.0, 10.0, rng) for a in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert exponential(10_000, 2.0, 10.0, rng) == 10.0
    assert exponential(10_000, 0.0, 10.0, rng) == 0.0


def test_jitter_is_base_plus_minus_25_percent() -> None:
    rng = random.Random(1)
    xs = [jitter(3, 4.0, 60.0, rng) for _ in range(SAMPLES)]
    assert min(xs) >= 0.75 * 4.0
    assert max(xs) <= 1.25 * 4.0
    assert statistics.fmean(xs) == pytest.approx(4.0, rel=0.02)
    assert len(set(xs)) > SAMPLES // 2
    assert jitter(0, 4.0, 2.0, rng) == 2.0


def test_exponential_jitter_first_median_matches_formula() -> None:
    median = statistics.median(_samples(0))
    theoretical = 2**0.5 * math.tanh(math.sqrt(2.0)) / 1.4  # u = 0.5 for attempt 0: ~0.897
    assert theoretical == pytest.approx(0.897, abs=0.001)
    assert median == pytest.approx(theoretical, rel=0.05)
    # Polly's "median first delay ~ baseDelay" is really ~0.9 * base, so +-10 % is too tight.
    assert median == pytest.approx(1.0, rel=0.15)


def test_exponential_jitter_medians_roughly_double() -> None:
    medians = [statistics.median(_samples(a)) for a in range(1, 4)]
    for earlier, later in itertools.pairwise(medians):
        assert 1.5 <= later / earlier <= 2.8


@pytest.mark.parametrize("attempt", range(5))
def test_exponential_jitter_range_matches_anchors(attempt: int) -> None:
    base = 3.0
    xs = _samples(attempt, base=base)
    f = base / 1.4
    if attempt <= 1:
        anchors_bound = f * 2 ** (attempt + 1)
    else:
        anchors_bound = f * (2 ** (attempt + 1) - 2 ** (attempt - 1))
    # Exact supremum: t -> attempt+1 and t_prev -> attempt-1. ANCHORS rounds tanh(...) to 1,
    # which is why attempt 2 can exceed its bound by ~1 %.
    exact_bound = f * (_curve(attempt + 1) - (_curve(attempt - 1) if attempt else 0.0))
    assert exact_bound == pytest.approx(anchors_bound, rel=0.04)
    assert all(0 < x <= exact_bound for x in xs)
    assert min(xs) < 0.05 * anchors_bound
    assert max(xs) > 0.9 * anchors_bound


@pytest.mark.parametrize("attempt", range(5))
def test_exponential_jitter_stateless_matches_polly_stateful(attempt: int) -> None:
    rng = random.Random(11)
    polly = sorted(_polly_stateful(attempt + 1, 1.0, rng)[-1] for _ in range(SAMPLES))
    ours = sorted(_samples(attempt))
    for decile in range(1, 10):
        i = decile * SAMPLES // 10
        assert ours[i] == pytest.approx(polly[i], rel=0.05)


def test_exponential_jitter_small_cap_stays_spread_early() -> None:
    cap = 1.2
    for attempt in range(2):
        xs = _samples(attempt, cap=cap)
        assert all(0 < x <= cap for x in xs)
        assert sum(x < cap for x in xs) > SAMPLES // 2
    rng = random.Random(5)
    assert {exponential_jitter(a, 1.0, cap, rng) for a in (60, 500, 998, 999, 10_000)} == {cap}


def test_exponential_jitter_huge_attempt_returns_cap() -> None:
    rng = random.Random(0)
    assert exponential_jitter(10_000, 1.0, 30.0, rng) == 30.0
    assert exponential_jitter(10_000, 0.0, 30.0, rng) == 0.0
    assert exponential_jitter(997, 1e300, 30.0, rng) == 30.0  # inf product clamps to cap


def test_zero_cap_and_zero_base_give_zero() -> None:
    for function in ALL_FUNCTIONS:
        assert function(3, 1.0, 0.0, random.Random(0)) == 0.0
        assert function(3, 0.0, 10.0, random.Random(0)) == 0.0


@pytest.mark.parametrize(
    ("policy", "function"),
    [
        (BackoffPolicy.CONSTANT, constant),
        (BackoffPolicy.JITTER, jitter),
        (BackoffPolicy.LINEAR, linear),
        (BackoffPolicy.EXPONENTIAL, exponential),
        (BackoffPolicy.EXPONENTIAL_JITTER, exponential_jitter),
    ],
)
def test_delay_seconds_dispatches(policy: BackoffPolicy, function: DelayFunction) -> None:
    for attempt in range(4):
        expected = function(attempt, 1.5, 100.0, random.Random(attempt))
        got = delay_seconds(policy, attempt, 1.5, 100.0, random.Random(attempt))
        assert got == expected
    assert 0 < delay_seconds(policy, 2, 1.5, 100.0) <= 100.0  # default rng


def test_delay_seconds_accepts_policy_name_and_rejects_unknown() -> None:
    assert delay_seconds(BackoffPolicy("linear"), 2, 1.0, 10.0) == 3.0
    with pytest.raises(ValueError, match="fibonacci"):
        delay_seconds("fibonacci", 0, 1.0, 10.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [
        (-1, 1.0, 10.0),
        (0, -0.5, 10.0),
        (0, 1.0, -1.0),
        (0, math.nan, 10.0),
        (0, 1.0, math.inf),
    ],
)
@pytest.mark.parametrize("policy", list(BackoffPolicy))
def test_invalid_arguments_raise(
    policy: BackoffPolicy, attempt: int, base: float, cap: float
) -> None:
    with pytest.raises(ValueError, match="must be"):
        delay_seconds(policy, attempt, base, cap, random.Random(0))
