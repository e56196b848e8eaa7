"""Bandwidth limits a host operator sets: token buckets for upload, download and back-to-source.

A `TokenBucket` is pure (it takes `now`); callers sleep for what `reserve` returns. Reserving
before sending keeps the average at the rate; the burst (a quarter second of the rate, and at
least one piece) lets a piece go out whole without stalls. A rate of 0 means unlimited.
Limits shared by all tasks of a daemon are one bucket; a per-task download limit is a second
bucket the task also reserves from.
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    def __init__(self, rate_bps: float, burst_bytes: float | None = None) -> None:
        self.rate = float(rate_bps)
        self.burst = float(burst_bytes if burst_bytes is not None else max(rate_bps / 4, 256 * 1024))
        self.tokens = self.burst
        self.last: float | None = None
        self.waited_s = 0.0  # total time callers were told to wait (a metric)

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def reserve(self, n: int, now: float) -> float:
        """Take `n` bytes' worth of tokens (the balance may go negative); seconds to wait."""
        if self.unlimited:
            return 0.0
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        wait = 0.0 if self.tokens >= 0 else -self.tokens / self.rate
        self.waited_s += wait
        return wait

    async def take(self, n: int) -> None:
        wait = self.reserve(n, time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)


async def take_all(n: int, *buckets: TokenBucket | None) -> None:
    """Reserve `n` bytes from every bucket given, then wait for the slowest."""
    now = time.monotonic()
    wait = max((b.reserve(n, now) for b in buckets if b is not None), default=0.0)
    if wait > 0:
        await asyncio.sleep(wait)
