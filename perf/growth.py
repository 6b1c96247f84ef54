"""`python -m perf.growth [--portfolios N] [--concurrency N] [--crashes N]`

Two growth figures, in-process, on a fresh embedded PostgreSQL (part of `make bench`):

* **forks per second**: N portfolios; each caller books one premium on a portfolio's
  Gen-Acc large enough to cross the fork threshold, so every acknowledged premium is a
  durable fork (the credit, the new unit, its two accounts and three fork legs in one
  commit). Baseline in the same run: the same number of plain premiums that do not fork,
  so the ratio shows what a fork costs over a credit.
* **restart latency**: with fault injection on, crash an account's actor N times (on a
  portfolio each, so no account nears its restart limit) and time from the failure
  (the failed request's 503) until the supervisor's fresh actor is resident again; and
  until the next deposit on that account is acknowledged.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time

from engine.errors import EngineError
from perf.common import Database, run_async, run_main

PREMIUM_FORKING_CENTS = 60_000_00   # above the default $50,000 threshold
PREMIUM_PLAIN_CENTS = 1_000_00


async def _timed(calls, concurrency: int) -> tuple[int, float, list[float]]:
    queue = list(calls)
    latencies: list[float] = []

    async def worker():
        while queue:
            call = queue.pop()
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return len(latencies), time.perf_counter() - started, sorted(latencies)


def _p(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


async def measure(url: str, portfolios: int, concurrency: int, crashes: int) -> dict:
    from actors.api import Engine
    from actors.settings import load_settings

    settings = load_settings({}, {"database": {"url": url}, "engine": {"fault_injection": True,
                                                                        "reinvest_schedule": False}})
    async with Engine(settings) as engine:
        created = await asyncio.gather(*[engine.create_portfolio(name=f"p{i}", owner="bench",
                                                                 initial_capital=300_000_00)
                                         for i in range(portfolios)])
        generation = [next(a.id for a in p.accounts if a.type == "generation") for p in created]
        revenue = [next(a.id for a in p.accounts if a.type == "revenue") for p in created]
        plain = [lambda a=a: engine.book_trade(a, kind="premium", amount=PREMIUM_PLAIN_CENTS) for a in revenue]
        count_plain, seconds_plain, latency_plain = await _timed(plain, concurrency)
        forks_before = await engine.store.fetch("SELECT count(*) AS n FROM portfolios WHERE parent_id IS NOT NULL")
        forking = [lambda a=a: engine.book_trade(a, kind="premium", amount=PREMIUM_FORKING_CENTS)
                   for a in generation]
        count_forks, seconds_forks, latency_forks = await _timed(forking, concurrency)
        forks_after = await engine.store.fetch("SELECT count(*) AS n FROM portfolios WHERE parent_id IS NOT NULL")
        assert forks_after[0]["n"] - forks_before[0]["n"] == count_forks, "every forking premium forked once"
        restart_ms, recovered_ms = await crash_and_time(engine, revenue[:crashes])
    return {
        "portfolios": portfolios, "concurrency": concurrency,
        "forks_per_s": count_forks / seconds_forks, "fork_p50_ms": _p(latency_forks, 0.5),
        "fork_p99_ms": _p(latency_forks, 0.99),
        "plain_premiums_per_s": count_plain / seconds_plain, "plain_p99_ms": _p(latency_plain, 0.99),
        "restarts": len(restart_ms), "restart_p50_ms": statistics.median(restart_ms) if restart_ms else None,
        "restart_max_ms": max(restart_ms) if restart_ms else None,
        "recovered_p50_ms": statistics.median(recovered_ms) if recovered_ms else None,
    }


async def crash_and_time(engine, accounts: list[str]) -> tuple[list[float], list[float]]:
    restart_ms, recovered_ms = [], []
    for account_id in accounts:
        await engine.inject_fault(account_id)
        old = engine.registry.peek(account_id)
        try:
            await engine.deposit(account_id, 1)
            raise AssertionError("the armed fault did not fire")
        except EngineError as error:
            assert error.code == "account_restarting", error.code
        failed = time.perf_counter()
        deadline = failed + 5.0
        while time.perf_counter() < deadline:
            entry = engine.registry.peek(account_id)
            if entry is not None and entry is not old and not entry.actor.restarted:
                break
            await asyncio.sleep(0.0002)
        restart_ms.append((time.perf_counter() - failed) * 1000)
        await engine.deposit(account_id, 1)
        recovered_ms.append((time.perf_counter() - failed) * 1000)
    return restart_ms, recovered_ms


def render(figures: dict) -> str:
    return "\n".join([
        f"Growth, in-process: {figures['portfolios']} portfolios, {figures['concurrency']} concurrent callers",
        f"  forks/s (durable)        {figures['forks_per_s']:>9,.0f}   p50 {figures['fork_p50_ms']:.2f} ms"
        f"   p99 {figures['fork_p99_ms']:.2f} ms",
        f"  plain premiums/s         {figures['plain_premiums_per_s']:>9,.0f}   p99 {figures['plain_p99_ms']:.2f} ms"
        f"   (baseline, same run; forks/premiums = "
        f"{figures['forks_per_s'] / figures['plain_premiums_per_s']:.2f})",
        f"  actor restart            median {figures['restart_p50_ms']:.2f} ms, max {figures['restart_max_ms']:.2f} ms"
        f" over {figures['restarts']} crashes (failure -> fresh actor resident, state re-read)",
        f"  crash -> next deposit ok median {figures['recovered_p50_ms']:.2f} ms",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="forks per second and actor restart latency")
    parser.add_argument("--portfolios", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--crashes", type=int, default=50)
    arguments = parser.parse_args(argv)
    # Injected crashes are expected here: keep their tracebacks out of the report.
    logging.getLogger("pykka").setLevel(logging.CRITICAL)
    logging.getLogger("alluse").setLevel(logging.CRITICAL)

    def body() -> int:
        with Database() as database:
            figures = run_async(measure(database.create("growth"), arguments.portfolios, arguments.concurrency,
                                        min(arguments.crashes, arguments.portfolios)))
        print(render(figures), flush=True)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
