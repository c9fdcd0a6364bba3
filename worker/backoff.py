"""Retry delays: how long to wait before re-sending a message after its ``attempt``-th failure.

Owns the five backoff policies (Polly v8 formulas, ``attempt`` is the 0-based retry index)
as pure functions of their arguments: randomness comes only from the ``random.Random``
passed in, and every result is clamped to ``[0, cap]`` and is never negative, NaN or inf.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final, TypeAlias

DelayFunction: TypeAlias = Callable[[int, float, float, random.Random], float]

_MAX_EXPONENT: Final = 1000  # 2**1000 ~ 1e301: beyond it every delay saturates at cap
_JITTER_FRACTION: Final = 0.25  # Polly: jitter on Constant/Linear adds +-25 %
_V2_P_FACTOR: Final = 4.0  # Polly DecorrelatedJitterBackoffV2 constants
_V2_SCALE: Final = 1 / 1.4

_default_rng = random.Random()


class BackoffPolicy(StrEnum):
    CONSTANT = "constant"
    JITTER = "jitter"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"
    EXPONENTIAL_JITTER = "exponential_jitter"


def _check(attempt: int, base: float, cap: float) -> None:
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    for name, value in (("base", base), ("cap", cap)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _clamp(value: float, cap: float) -> float:
    return min(max(value, 0.0), cap)


def _saturated(base: float, cap: float) -> float:
    """The limit of every growing policy for a huge attempt: cap, or 0 when base is 0."""
    return cap if base > 0 else 0.0


def constant(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    _check(attempt, base, cap)
    return _clamp(base, cap)


def jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Constant delay with Polly's uniform jitter: base * U[0.75, 1.25)."""
    _check(attempt, base, cap)
    return _clamp(base * (1 - _JITTER_FRACTION + 2 * _JITTER_FRACTION * rng.random()), cap)


def linear(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    _check(attempt, base, cap)
    return _clamp(min(attempt + 1, 2.0**_MAX_EXPONENT) * base, cap)


def exponential(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    _check(attempt, base, cap)
    if attempt >= _MAX_EXPONENT:
        return _saturated(base, cap)
    return _clamp(2.0**attempt * base, cap)


def _v2_curve(t: float) -> float:
    return math.exp2(t) * math.tanh(math.sqrt(_V2_P_FACTOR * t))


def exponential_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Polly's DecorrelatedJitterBackoffV2, made stateless.

    Polly keeps ``prev`` (the curve value of the previous retry) between calls; a message
    here carries only its attempt count, so ``prev`` is recomputed from the previous
    attempt's formula with a fresh, independent uniform draw (0 for attempt 0). Polly's
    previous draw was independent too, so each attempt's distribution is unchanged, and as
    the curve is increasing and the previous ``t`` is smaller, the delay is always positive.
    """
    _check(attempt, base, cap)
    if attempt + 1 >= _MAX_EXPONENT:
        return _saturated(base, cap)
    t = attempt + rng.random()
    prev = _v2_curve(attempt - 1 + rng.random()) if attempt > 0 else 0.0
    return _clamp((_v2_curve(t) - prev) * _V2_SCALE * base, cap)


_POLICIES: Final[Mapping[BackoffPolicy, DelayFunction]] = MappingProxyType(
    {
        BackoffPolicy.CONSTANT: constant,
        BackoffPolicy.JITTER: jitter,
        BackoffPolicy.LINEAR: linear,
        BackoffPolicy.EXPONENTIAL: exponential,
        BackoffPolicy.EXPONENTIAL_JITTER: exponential_jitter,
    }
)


def delay_seconds(
    policy: BackoffPolicy,
    attempt: int,
    base: float,
    cap: float,
    rng: random.Random | None = None,
) -> float:
    """Delay in seconds before retry ``attempt`` (0 = first retry) under ``policy``."""
    function = _POLICIES[BackoffPolicy(policy)]  # unknown names raise ValueError
    return function(attempt, base, cap, _default_rng if rng is None else rng)
