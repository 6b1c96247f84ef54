"""`python -m perf.naive [--quick] [--seconds N] [--concurrency N] [--only uniform|skewed]`

The naive baseline of issue 4, side by side with the engine in the same run: what a user
might write instead of the engine - one PostgreSQL transaction per transfer over an
asyncpg pool (as many connections as callers), row locks taken with
`SELECT ... FOR UPDATE` on both accounts in id order (no deadlocks), the balance checked,
both balances and versions updated, two entry rows (sequence = version + 1,
balance_after) and one outbox (`events`) row per leg inserted, then COMMIT.

Each design runs on its own fresh database with our schema (the naive one gets it by
starting and stopping an `Engine`, then its accounts are bulk-inserted) and the same
workloads, driven by `perf.bench.drive`:

* `transfers-uniform`: source and target uniform over the accounts;
* `transfers-zipf`: both chosen with a Zipf law (s = 1.1 by default) over the accounts,
  so a few hot accounts take much of the traffic (with s = 1.1 over 1,000 accounts the
  10 hottest take ~48% of the draws).

Prints a table with the engine's ratio to the naive design and writes
`perf/results/naive-<timestamp>.json`. Bounded in time and requests; one embedded
PostgreSQL in a temporary directory, removed afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import platform
import random
import signal
import sys
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from functools import lru_cache
from pathlib import Path

from perf.bench import (RESULTS_DIR, SETUP_TIMEOUT_S, Database, Measurement, Result, RunConfig, Snapshot, Workload,
                        _event_loop_factory, _fmt, _check_label, cpu_sample, drive, progress, run_in_process,
                        summarize, verify)


@lru_cache(maxsize=8)
def _zipf_cumulative(accounts: int, s: float) -> tuple[float, ...]:
    return tuple(itertools.accumulate(1.0 / (rank ** s) for rank in range(1, accounts + 1)))


@dataclass(frozen=True)
class ZipfWorkload(Workload):
    """Source and target drawn (distinct) with P(rank k) ~ 1 / k**s: a few hot accounts."""

    name: str = "transfers-zipf"
    zipf_s: float = 1.1

    def _draw(self, rng: random.Random) -> int:
        cumulative = _zipf_cumulative(self.accounts, self.zipf_s)
        return min(self.accounts - 1, bisect.bisect_left(cumulative, rng.random() * cumulative[-1]))

    def pick(self, rng: random.Random) -> tuple[int, int, int]:
        source = self._draw(rng)
        target = self._draw(rng)
        while target == source:
            target = self._draw(rng)
        return source, target, rng.randint(self.amount_min, self.amount_max)

    def hot_share(self, top: int = 10) -> float:
        cumulative = _zipf_cumulative(self.accounts, self.zipf_s)
        return cumulative[min(top, self.accounts) - 1] / cumulative[-1]


# -- the naive design --------------------------------------------------------------------
LOCK = "SELECT id, balance, version FROM accounts WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
UPDATE = "UPDATE accounts SET balance = $2, version = $3, updated_at = $4 WHERE id = $1"
INSERT_ENTRY = ("INSERT INTO entries (id, account_id, sequence, kind, direction, amount, balance_after, "
                "counterparty_account_id, memo, correlation_id, effective_date, created_at) "
                "VALUES ($1, $2, $3, 'transfer', $4, $5, $6, $7, NULL, $8, $9, $10)")
INSERT_EVENT = ("INSERT INTO events (type, account_id, portfolio_id, correlation_id, payload, created_at) "
                "VALUES ('entry.posted', $1, NULL, $2, $3::jsonb, $4)")


class InsufficientFunds(Exception):
    pass


async def _naive(url: str, pgdata: str, workload: Workload, config: RunConfig) -> Measurement:
    import asyncpg

    from actors.api import Engine
    from actors.settings import load_settings

    progress("naive: applying our migrations (start and stop an Engine)")
    async with Engine(load_settings({}, {"database": {"url": url}})):
        pass
    now = datetime.now(timezone.utc)
    today = now.date()
    ids = [f"acc_naive_{index:07d}" for index in range(workload.accounts)]
    pool = await asyncpg.create_pool(url, min_size=config.concurrency, max_size=config.concurrency)
    try:
        progress(f"naive: bulk-inserting {workload.accounts} funded accounts")
        await asyncio.wait_for(pool.execute(
            "INSERT INTO accounts (id, name, type, status, owner, balance, version, opened_on, created_at, "
            "updated_at) SELECT id, 'naive-' || id, $2, 'active', 'perf', $3, 1, $4, $5, $5 "
            "FROM unnest($1::text[]) AS id", ids, workload.account_type, workload.initial_balance, today, now),
            SETUP_TIMEOUT_S)
        counter = itertools.count()

        async def transfer(source: str, target: str, amount: int) -> None:
            transfer_id = f"xfr_naive_{next(counter)}"
            async with pool.acquire() as connection, connection.transaction():
                rows = {row["id"]: row for row in await connection.fetch(LOCK, [source, target])}
                debit, credit = rows[source], rows[target]
                if debit["balance"] < amount:
                    raise InsufficientFunds
                stamp = datetime.now(timezone.utc)
                for row, direction, balance in ((debit, "debit", debit["balance"] - amount),
                                                (credit, "credit", credit["balance"] + amount)):
                    sequence = row["version"] + 1
                    other = target if row is debit else source
                    await connection.execute(UPDATE, row["id"], balance, sequence, stamp)
                    entry_id = f"{transfer_id}_{direction}"
                    await connection.execute(INSERT_ENTRY, entry_id, row["id"], sequence, direction, amount, balance,
                                             other, transfer_id, stamp.date(), stamp)
                    await connection.execute(INSERT_EVENT, row["id"], transfer_id, json.dumps(
                        {"entry_id": entry_id, "direction": direction, "amount": amount,
                         "balance_after": balance}), stamp)

        async def call(source: int, target: int, amount: int) -> str | None:
            try:
                await transfer(ids[source], ids[target], amount)
                return None
            except InsufficientFunds:
                return "insufficient_funds"
            except Exception as error:  # noqa: BLE001 - counted, reported by type
                return type(error).__name__

        commits = 0

        async def snapshot() -> Snapshot:     # one transfer = one transaction = one "batch"
            return {"batches": 0, "operations": 0, "commits": commits, "commit_s": 0.0,
                    "cpu": cpu_sample(own="engine", pgdata=pgdata)}

        progress(f"naive: {config.concurrency} callers, {config.warmup_s:g} s warm-up + {config.seconds:g} s measured")
        return await drive(call, workload, config, snapshot)
    finally:
        await pool.close()


def run_naive(database: Database, db_name: str, workload: Workload, config: RunConfig, loop: str) -> Result:
    url = database.create(db_name)
    with asyncio.Runner(loop_factory=_event_loop_factory(loop)) as runner:
        measurement = runner.run(_naive(url, database.pgdata, workload, config))
    result = summarize("naive", workload, config, measurement)
    result.notes = [n for n in result.notes if "group commit" not in n]   # no batches by design
    verify(url, workload, measurement, result)
    return result


def run_engine(database: Database, db_name: str, workload: Workload, config: RunConfig, loop: str) -> Result:
    # run_in_process creates "bench_in_process"; use our own name so several can coexist
    import perf.bench as bench

    original = bench.Database.create
    try:
        bench.Database.create = lambda self, _name, _create=original: _create(self, db_name)
        return run_in_process(database, workload, config, loop)
    finally:
        bench.Database.create = original


# -- reporting ---------------------------------------------------------------------------
def render(results: list[Result], config: RunConfig) -> str:
    by_key = {(r.workload, r.run): r for r in results}
    header = ("workload", "design", "callers", "transfers/s", "p50 ms", "p95 ms", "p99 ms", "errors",
              "CPU engine/pg", "check", "engine / naive")
    rows = []
    for r in results:
        errors = ", ".join(f"{code} x{count}" for code, count in sorted(r.errors.items())) or "none"
        naive = by_key.get((r.workload, "naive"))
        ratio = (f"{r.per_second / naive.per_second:.1f}x" if r.run == "in-process" and naive and naive.per_second
                 else "")
        rows.append((r.workload, r.run, str(r.concurrency), _fmt(r.per_second, 0), _fmt(r.p50_ms, 2),
                     _fmt(r.p95_ms, 2), _fmt(r.p99_ms, 2), errors,
                     f"{_fmt(r.cpu_cores.get('engine'), 2)}/{_fmt(r.cpu_cores.get('postgres'), 2)}",
                     _check_label(r.check), ratio))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = {0, 1, 7, 9}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"Engine (in-process) vs naive (one SQL transaction per transfer, row locks), {config.seconds:g} s "
           f"measured after {config.warmup_s:g} s warm-up", line(header), line(["-" * w for w in widths]),
           *(line(row) for row in rows)]
    for r in results:
        for note in r.notes:
            out.append(f"note ({r.workload}, {r.run}): {note}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.naive", description=(
        "The engine in-process against the naive design (one PostgreSQL transaction per transfer with row "
        "locks), uniform and Zipf-skewed account choice, on a temporary embedded PostgreSQL."))
    parser.add_argument("--quick", action="store_true", help="short runs (what `make bench` does)")
    parser.add_argument("--seconds", type=float, help="measured seconds per run (quick: 5, otherwise 15)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds (quick: 1, otherwise 3)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent callers (= naive pool size)")
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of the skewed workload")
    parser.add_argument("--only", choices=("uniform", "skewed"), help="run one of the two workloads")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 5.0 if args.quick else 15.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 3.0
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be in (0, 600] and --warmup in [0, 60]")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be 1 to 1024 (the naive pool opens that many connections)")
    if not 2 <= args.accounts <= 100_000 or args.zipf_s <= 0:
        parser.error("--accounts must be 2 to 100000 and --zipf-s positive")
    return args


def _terminated(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    started = datetime.now(timezone.utc)
    config = RunConfig(concurrency=args.concurrency, warmup_s=args.warmup, seconds=args.seconds)
    workloads = []
    if args.only in (None, "uniform"):
        workloads.append(Workload(accounts=args.accounts))
    if args.only in (None, "skewed"):
        workloads.append(ZipfWorkload(accounts=args.accounts, zipf_s=args.zipf_s))
    results: list[Result] = []
    database = Database()
    try:
        try:
            progress(f"starting an embedded PostgreSQL in {database.tmp}")
            database.start()
            for number, workload in enumerate(workloads):
                results.append(run_engine(database, f"engine_{number}", workload, config, args.loop))
                progress(f"{workload.name} in-process: {results[-1].per_second:,.0f} transfers/s")
                results.append(run_naive(database, f"naive_{number}", workload, config, args.loop))
                progress(f"{workload.name} naive: {results[-1].per_second:,.0f} transfers/s")
        finally:
            progress("stopping PostgreSQL and removing its directory")
            database.close()
    except KeyboardInterrupt:
        progress("interrupted; nothing written")
        return 130
    print()
    print(render(results, config))
    for workload in workloads:
        if isinstance(workload, ZipfWorkload):
            print(f"skew: Zipf s={workload.zipf_s:g} over {workload.accounts:,} accounts; the 10 hottest take "
                  f"{workload.hot_share(10):.0%} of draws")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"naive-{started.strftime('%Y%m%d-%H%M%S')}.json"
    ratios = {}
    for workload in workloads:
        engine = next((r for r in results if r.workload == workload.name and r.run == "in-process"), None)
        naive = next((r for r in results if r.workload == workload.name and r.run == "naive"), None)
        if engine and naive and naive.per_second:
            ratios[workload.name] = round(engine.per_second / naive.per_second, 2)
    path.write_text(json.dumps({
        "benchmark": "perf.naive", "format": 1, "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(), "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "event_loop": args.loop},
        "workloads": [asdict(w) for w in workloads], "config": asdict(config),
        "engine_to_naive": ratios, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(f"\nresults: {path}")
    if any(_check_label(r.check) == "FAILED" for r in results):
        print("the database check FAILED: see the notes above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
