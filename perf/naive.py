"""`python -m perf.naive [--quick] [--seconds N] [--concurrency N ...] [--only uniform|skewed]`

The naive baseline of issue 4: what a user might write instead of the engine - one
PostgreSQL transaction per transfer over an asyncpg pool (as many connections as
callers, at most 64: the callers beyond wait for a connection), row locks taken with
`SELECT ... FOR UPDATE` on both accounts in id order (no deadlocks), the balance checked,
both balances and versions updated, two entry rows (sequence = version + 1,
balance_after) and one outbox (`events`) row per leg inserted, then COMMIT.

`naive_session` runs any transfer workload of `perf.workloads` (uniform, or Zipf-skewed:
with s = 1.1 over 1,000 accounts the 10 hottest take ~48% of the draws) at any number of
callers on a fresh database with our schema (applied by starting and stopping an
`Engine`; the accounts are then bulk-inserted, funded). `python -m perf.bench` calls it
for its ratios; run alone, this script puts the engine in-process and the naive design
side by side and writes `perf/results/naive-<timestamp>.json`.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone

from perf.common import (RESULTS_DIR, SETUP_TIMEOUT_S, Database, ProgressBar, RunConfig, Session, Snapshot,
                         add_window_arguments, cpu_sample, drive, fmt, machine_description, render_rows,
                         resolve_window, run_async, run_main, shown_path, summarize)
from perf.workloads import ACCOUNTS, INITIAL_BALANCE_CENTS, TRANSFERS, WORKLOADS, Workload

POOL_CONNECTIONS_MAX = 64   # PostgreSQL allows 100 connections by default

# -- the naive design --------------------------------------------------------------------
LOCK = "SELECT id, balance, version FROM accounts WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
UPDATE = "UPDATE accounts SET balance = $2, version = $3, updated_at = $4 WHERE id = $1"
INSERT_ENTRY = ("INSERT INTO entries (id, account_id, sequence, kind, direction, amount, balance_after, "
                "counterparty_account_id, memo, correlation_id, effective_date, created_at) "
                "VALUES ($1, $2, $3, 'transfer', $4, $5, $6, $7, NULL, $8, $9, $10)")
INSERT_EVENT = ("INSERT INTO events (type, account_id, portfolio_id, correlation_id, payload, created_at) "
                "VALUES ('entry.posted', $1, NULL, $2, $3::jsonb, $4)")
INSERT_ACCOUNTS = ("INSERT INTO accounts (id, name, type, status, owner, balance, version, opened_on, created_at, "
                   "updated_at) SELECT id, 'naive-' || id, 'revenue', 'active', 'perf', $2, 1, $3, $4, $4 "
                   "FROM unnest($1::text[]) AS id")


class InsufficientFunds(Exception):
    pass


def _transfer(pool, counter):
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

    return transfer


async def naive_session(url: str, pgdata: str | None, runs: list[tuple[Workload, int]], window: RunConfig,
                        repeats: int, bar: ProgressBar) -> Session:
    """Every (transfer workload, callers) of `runs`, `repeats` times, on one database;
    then the check: money conserved and every acknowledged transfer present."""
    import asyncpg

    from actors.api import Engine
    from actors.settings import load_settings

    async with Engine(load_settings({}, {"database": {"url": url}, "engine": {"reinvest_schedule": False}})):
        pass   # our schema, from our migrations
    now = datetime.now(timezone.utc)
    ids = [f"acc_naive_{index:07d}" for index in range(ACCOUNTS)]
    connections = min(POOL_CONNECTIONS_MAX, max(level for _, level in runs))
    pool = await asyncpg.create_pool(url, min_size=connections, max_size=connections)
    try:
        await asyncio.wait_for(pool.execute(INSERT_ACCOUNTS, ids, INITIAL_BALANCE_CENTS, now.date(), now),
                               SETUP_TIMEOUT_S)
        transfer = _transfer(pool, itertools.count())

        async def call(source: int, target: int, amount: int) -> str | None:
            try:
                await transfer(ids[source], ids[target], amount)
                return None
            except InsufficientFunds:
                return "insufficient_funds"
            except Exception as error:  # noqa: BLE001 - counted, reported by type
                return type(error).__name__

        async def snapshot() -> Snapshot:     # one transfer = one transaction: no batches
            return {"cpu": cpu_sample(own="engine", pgdata=pgdata)}

        results, acknowledged = [], 0
        for _ in range(repeats):
            for workload, concurrency in runs:
                assert workload.operation == "transfer", workload
                config = RunConfig(concurrency=concurrency, warmup_s=window.warmup_s, seconds=window.seconds)
                measurement = await drive(call, workload.pick, config, snapshot)
                acknowledged += measurement.acknowledged_total
                results.append(summarize("naive", workload.name, config, measurement))
                bar.advance(f"naive {workload.name} x{concurrency}: {results[-1].per_second:,.0f}/s")
        total = await pool.fetchval("SELECT coalesce(sum(balance), 0)::bigint FROM accounts")
        legs = await pool.fetchval("SELECT count(*) FROM entries WHERE kind = 'transfer'")
    finally:
        await pool.close()
    expected = ACCOUNTS * INITIAL_BALANCE_CENTS
    problems = []
    if total != expected:
        problems.append(f"MONEY NOT CONSERVED: {total} cents, expected {expected}")
    if legs < 2 * acknowledged:
        problems.append(f"ACKNOWLEDGED BUT MISSING: {legs} transfer legs for {acknowledged} transfers")
    return Session(results, {"balance_total": total, "balance_expected": expected, "transfer_legs": legs,
                             "acknowledged_transfers": acknowledged, "ok": not problems, "problems": problems})


# -- alone: the engine in-process against the naive design ---------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.naive", description=(
        "The engine in-process against the naive design (one PostgreSQL transaction per transfer with row "
        "locks), uniform and Zipf-skewed account choice, on a temporary embedded PostgreSQL."))
    add_window_arguments(parser, quick=(3.0, 1.0), full=(10.0, 2.0))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64], help="concurrent callers")
    parser.add_argument("--only", choices=("uniform", "skewed"), help="run one of the two workloads")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    resolve_window(parser, args)
    if not all(1 <= level <= 1000 for level in args.concurrency):
        parser.error("--concurrency must be 1 to 1000")
    return args


def main(argv: list[str] | None = None) -> int:
    from perf.bench import in_process_session

    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    window = RunConfig(warmup_s=args.warmup, seconds=args.seconds)
    names = [name for name in TRANSFERS if args.only is None or (name == "transfers-zipf") == (args.only == "skewed")]
    runs = [(WORKLOADS[name], level) for name in names for level in args.concurrency]

    def body() -> int:
        with Database() as database, ProgressBar(2 * len(runs), "engine vs naive") as bar:
            engine = run_async(in_process_session(database.create("engine"), database.pgdata, runs, window, 1,
                                                  bar), args.loop)
            naive = run_async(naive_session(database.create("naive"), database.pgdata, runs, window, 1, bar),
                              args.loop)
        rows = []
        for mine, theirs in zip(engine.results, naive.results):
            rows.append((mine.workload, str(mine.concurrency), fmt(mine.per_second, 0), fmt(mine.p99_ms, 2),
                         fmt(theirs.per_second, 0), fmt(theirs.p99_ms, 2),
                         f"{mine.per_second / theirs.per_second:.1f}x" if theirs.per_second else "-"))
        print()
        print(f"Engine in-process vs naive, durable transfers, {args.seconds:g} s after {args.warmup:g} s warm-up")
        print("\n".join(render_rows(("workload", "callers", "engine/s", "engine p99 ms", "naive/s", "naive p99 ms",
                                     "engine / naive"), rows, {0})))
        checks = {"engine": engine.check, "naive": naive.check}
        for name, check in checks.items():
            print(f"check ({name}): " + ("ok" if check["ok"] else "; ".join(check["problems"])))
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"naive-{started.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({
            "benchmark": "perf.naive", "format": 2, "started_at": started.isoformat(), "quick": args.quick,
            "machine": machine_description(args.loop), "window": asdict(window), "checks": checks,
            "results": [asdict(r) for r in engine.results + naive.results]}, indent=2) + "\n")
        print(f"\nresults: {shown_path(path)}")
        return 0 if all(check["ok"] for check in checks.values()) else 1

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
