"""Abuse limits at the edge: a token bucket per API token, and a cap on missing or
invalid tokens per client address. Both are bounded in memory (the least recently seen
keys are forgotten first) and take the clock as an argument, so tests can drive them."""
from __future__ import annotations

import math
from collections import OrderedDict

KEYS_MAX = 100_000


class TokenBuckets:
    """`rate_per_s` requests per second per key, with bursts up to `burst`."""

    def __init__(self, rate_per_s: float, burst: int, keys_max: int = KEYS_MAX):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.keys_max = keys_max
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0 when the request may go; otherwise the seconds until it could."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.burst), now]
            while len(self._buckets) > self.keys_max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate_per_s)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate_per_s

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)


class FailureWindows:
    """Counts failures per key in fixed windows; past `failures_max` in a window the key
    is blocked until the window ends."""

    def __init__(self, failures_max: int, window_s: float, keys_max: int = KEYS_MAX):
        self.failures_max = failures_max
        self.window_s = window_s
        self.keys_max = keys_max
        self._windows: OrderedDict[str, list[float]] = OrderedDict()

    def blocked_for(self, key: str, now: float) -> float:
        """Seconds this key stays blocked (0: not blocked)."""
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            return 0.0
        if window[1] >= self.failures_max:
            return window[0] + self.window_s - now
        return 0.0

    def fail(self, key: str, now: float) -> None:
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            self._windows[key] = [now, 1.0]
            while len(self._windows) > self.keys_max:
                self._windows.popitem(last=False)
        else:
            window[1] += 1
        self._windows.move_to_end(key)


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
