"""`python -m perf.million [--accounts N] [--reads N] [--resident N]`

Scale figures of issue 4 (part of `make bench-full`, whose `perf.bench` calls `measure`;
not of `make bench`: writing a million accounts takes a while): with N accounts in PostgreSQL (default 1,000,000,
written straight into the table with zero balances, so every ledger invariant holds),
* start-up to ready: `Engine.start()` on the populated database (migrations checked,
  writer connected; accounts are activated on demand, nothing is loaded up front);
* reading a random cold account: `get_account` of accounts never touched before (each
  read activates an actor from its row), p50/p99;
* memory per resident account actor: RSS growth while activating `--resident` accounts.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time

from perf.common import Database, run_async, run_main

POPULATE = """
INSERT INTO accounts (id, name, type, status, owner, balance, baseline, version, opened_on, created_at, updated_at)
SELECT 'acc_bulk_' || lpad(i::text, 10, '0'), 'bulk ' || i,
       (ARRAY['generation', 'revenue', 'compounding'])[1 + i % 3], 'active', 'owner-' || (i % 10000),
       0, 0, 0, current_date, now(), now()
FROM generate_series(1, $1) AS i"""


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, accounts: int, reads: int, resident: int) -> dict:
    import asyncpg

    from actors.api import Engine
    from actors.settings import load_settings

    settings = load_settings({}, {"database": {"url": url},
                                  "engine": {"reinvest_schedule": False, "resident_accounts_max": max(resident, 16)}})
    async with Engine(settings):
        pass  # applies the migrations
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await connection.execute(POPULATE, accounts)
        await connection.execute("ANALYZE accounts")
        populate_s = time.perf_counter() - started
    finally:
        await connection.close()
    engine = Engine(settings)
    started = time.perf_counter()
    await engine.start()
    ready_s = time.perf_counter() - started
    try:
        assert await engine.check_ready()
        ids = [f"acc_bulk_{i:010d}" for i in random.sample(range(1, accounts + 1), reads + resident)]
        latencies = []
        for account_id in ids[:reads]:
            begun = time.perf_counter()
            await engine.get_account(account_id)
            latencies.append((time.perf_counter() - begun) * 1000)
        before, resident_before = _rss_bytes(), len(engine.registry)
        for index in range(0, resident, 500):
            await asyncio.gather(*[engine.get_account(a) for a in ids[reads + index:reads + index + 500]])
        per_actor = (_rss_bytes() - before) / max(1, len(engine.registry) - resident_before)
    finally:
        await engine.stop()
    return {"accounts": accounts, "populate_s": populate_s, "ready_s": ready_s, "reads": reads,
            "cold_read_p50_ms": _percentile(latencies, 0.5), "cold_read_p99_ms": _percentile(latencies, 0.99),
            "resident": resident, "bytes_per_resident_actor": per_actor}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--reads", type=int, default=2_000)
    parser.add_argument("--resident", type=int, default=50_000)
    arguments = parser.parse_args(argv)
    logging.getLogger("alluse").setLevel(logging.WARNING)

    def body() -> int:
        with Database() as database:
            figures = run_async(measure(database.create("million"), arguments.accounts, arguments.reads,
                                        arguments.resident))
        print(render(figures))
        return 0

    return run_main(body)


def render(figures: dict) -> str:
    return "\n".join([
        f"{figures['accounts']:,} accounts (written in {figures['populate_s']:.1f} s)",
        f"  start-up to ready        {figures['ready_s'] * 1000:8.0f} ms   (target <= 3000 ms)",
        f"  random cold account read p50 {figures['cold_read_p50_ms']:.2f} ms, p99 {figures['cold_read_p99_ms']:.2f} ms"
        f" over {figures['reads']:,} reads (target p99 <= 10 ms)",
        f"  memory per resident account actor ~{figures['bytes_per_resident_actor']:,.0f} bytes "
        f"(RSS growth over {figures['resident']:,} activations)"])


if __name__ == "__main__":
    sys.exit(main())
