"""The default retry delay, a pure function so its formula can be tested exactly."""

from collections.abc import Callable


def backoff_ms(attempts: int, base_ms: int, max_ms: int, rand: Callable[[], float]) -> int:
    """`min(max_ms, base_ms * 2**(attempts - 1))`, then ±10% jitter.

    Exponential so a failing dependency is not hammered; capped so a job is never parked
    for days; jittered so jobs that failed together do not all return together.
    `rand` returns a float in [0, 1).
    """
    exponent = min(max(attempts - 1, 0), 64)  # 2**64 ms is far past any cap
    delay: int = min(max_ms, base_ms * 2**exponent)
    return max(0, round(delay * (0.9 + 0.2 * rand())))
