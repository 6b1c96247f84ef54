"""One keyed-transfer run, printed as one line: the quickest A/B of the operation path.

    .venv/bin/python -m perf.keyed [--seconds 10] [--callers 64] [--no-database] [--unkeyed] [--windows N] [--io]

A fresh embedded PostgreSQL, an in-process `Engine`, 1,000 funded accounts, then
`--callers` closed-loop callers each sending `Engine.transfer` with its own uuid
idempotency key for `--seconds`. It prints transfers/s, p50/p99 latency, CPU µs per
transfer of this process and of PostgreSQL (from /proc, like
`../shared/contract/operation_budget.py`), WAL bytes per transfer, the mean batch and the
mean time from a batch's start to its commit.

`--no-database` replaces the batch's statement by a 1 ms sleep once the accounts are
funded: what the engine's own path costs, and the rate at which it alone saturates the
event loop. Run it from two checkouts alternately (same machine, same hour) to compare.

`--io` adds, per window, what PostgreSQL wrote per transfer (`pg_stat_io`, PostgreSQL 16
and later): the pages the writer's backend wrote out itself (`be_writes`: dirty pages it
evicted), the pages it added to relations (`be_extends`), the pages the background
writer and the checkpointer wrote (`bg_writes`), full-page images in the WAL (`fpi`) and
the checkpoints in the window; and after the last window the bytes each table and index
grew by per transfer.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid

from perf.common import Database, cpu_sample, run_async

ACCOUNTS = 1_000
FUNDS = 10 ** 9


async def funded_accounts(engine, owner: str) -> list[str]:
    """`ACCOUNTS` revenue accounts of `owner`, each funded with `FUNDS` by a keyed
    deposit (100 at a time); their ids."""
    ids = [(await engine.create_account(name=f"{owner}{i}", type="revenue", owner=owner)).id
           for i in range(ACCOUNTS)]
    for start in range(0, ACCOUNTS, 100):
        await asyncio.gather(*(engine.deposit(i, FUNDS, idempotency_key=uuid.uuid4().hex)
                               for i in ids[start:start + 100]))
    return ids


async def run(url: str, pgdata: str, seconds: float, callers: int, no_database: bool, keyed: bool = True,
              windows: int = 1, report=None, io: bool = False) -> dict:
    from actors.api import Engine
    from actors.settings import load_settings
    from persistence import store

    settings = load_settings({}, {"database": {"url": url}, "engine": {"reinvest_schedule": False}})
    async with Engine(settings) as engine:
        ids = await funded_accounts(engine, "keyed")
        if no_database:
            async def sleep_instead(_connection, batch) -> None:
                batch.args()
                await asyncio.sleep(0.001)
            store.write_batch = sleep_instead
        rng = random.Random(7)
        pool = engine.store.pool
        sizes = await _relation_sizes(pool) if io else {}
        transfers = 0
        for window in range(windows):
            before = await _io_sample(pool) if io else None
            result = await _window(engine, pgdata, ids, rng, seconds, callers, keyed, no_database)
            done = round(result["transfers_per_s"] * seconds)
            transfers += done
            if io:
                result.update(_io_per_transfer(before, await _io_sample(pool), done))
            if report is not None:
                report(window, result)
        if io and report is not None:
            grown = {name: size - sizes.get(name, 0) for name, size in (await _relation_sizes(pool)).items()}
            report(None, {f"{name}_bytes": round(grown[name] / max(1, transfers))
                          for name in sorted(grown, key=grown.get, reverse=True) if grown[name] > 0})
        return result


async def _io_sample(pool) -> dict:
    """PostgreSQL's I/O counters so far (`pg_stat_io`, `pg_stat_wal`, checkpoints)."""
    rows = await pool.fetch("SELECT backend_type, coalesce(sum(writes), 0) AS writes, "
                            "coalesce(sum(extends), 0) AS extends FROM pg_stat_io WHERE object = 'relation' "
                            "GROUP BY backend_type")
    io = {row["backend_type"]: (float(row["writes"]), float(row["extends"])) for row in rows}
    return {"be": io.get("client backend", (0.0, 0.0)),
            "bg": sum(io.get(kind, (0.0, 0.0))[0] for kind in ("background writer", "checkpointer")),
            "fpi": float(await pool.fetchval("SELECT wal_fpi FROM pg_stat_wal")),
            "checkpoints": await pool.fetchval("SELECT num_timed + num_requested FROM pg_stat_checkpointer")}


def _io_per_transfer(before: dict, after: dict, transfers: int) -> dict:
    n = max(1, transfers)
    return {"be_writes": round((after["be"][0] - before["be"][0]) / n, 3),
            "be_extends": round((after["be"][1] - before["be"][1]) / n, 3),
            "bg_writes": round((after["bg"] - before["bg"]) / n, 3),
            "fpi": round((after["fpi"] - before["fpi"]) / n, 3),
            "checkpoints": after["checkpoints"] - before["checkpoints"]}


async def _relation_sizes(pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT relname, pg_relation_size(oid) AS size FROM pg_class "
                            "WHERE relkind IN ('r', 'i') AND relnamespace = 'public'::regnamespace")
    return {row["relname"]: row["size"] for row in rows}


async def _window(engine, pgdata: str, ids: list[str], rng: random.Random, seconds: float, callers: int, keyed: bool,
                  no_database: bool) -> dict:
    """One measured window of `callers` closed-loop callers for `seconds`."""
    latencies = []
    wal_before = await engine.store.pool.fetchval("SELECT pg_current_wal_lsn()")
    batches_before, ops_before = engine.writer.batches, engine.writer.operations
    commit_s_before = _commit_seconds(engine)
    before = cpu_sample(own="engine", pgdata=pgdata)
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < end:
            a, b = rng.sample(ids, 2)
            started = time.perf_counter()
            await engine.transfer(a, b, rng.randint(1, 100), idempotency_key=uuid.uuid4().hex if keyed else None)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(callers)))
    after = cpu_sample(own="engine", pgdata=pgdata)
    wal = await engine.store.pool.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", wal_before)
    done = len(latencies)
    latencies.sort()
    return {"transfers_per_s": round(done / seconds), "p50_ms": round(latencies[done // 2] * 1e3, 2),
            "p99_ms": round(latencies[int(done * 0.99)] * 1e3, 2),
            "engine_us": round((after["engine"] - before["engine"]) / done * 1e6, 1),
            "pg_us": round((after.get("postgres", 0) - before.get("postgres", 0)) / done * 1e6, 1),
            "wal_bytes": round(float(wal) / done) if not no_database else 0,
            "avg_batch": round((engine.writer.operations - ops_before)
                               / max(1, engine.writer.batches - batches_before), 1),
            "avg_commit_ms": round((_commit_seconds(engine) - commit_s_before) * 1e3
                                   / max(1, engine.writer.batches - batches_before), 2)}


def _commit_seconds(engine) -> float:
    """Seconds spent committing batches so far (the writer's commit-latency histogram)."""
    return next(sample.value for metric in engine.metrics.commit_latency.collect() for sample in metric.samples
                if sample.name.endswith("_sum"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--no-database", action="store_true", help="a 1 ms sleep instead of each batch's statement")
    parser.add_argument("--unkeyed", action="store_true", help="transfers without an idempotency key")
    parser.add_argument("--windows", type=int, default=1,
                        help="measure this many windows of --seconds one after another on the same database, "
                             "a line each (the steady state costs more than a fresh database)")
    parser.add_argument("--io", action="store_true",
                        help="also what PostgreSQL wrote per transfer (pg_stat_io, PostgreSQL 16+), and what each "
                             "table and index grew by")
    args = parser.parse_args()
    database = Database()

    def report(window: int | None, result: dict) -> None:
        prefix = "grown per transfer " if window is None else f"window {window} " if args.windows > 1 else ""
        print(prefix + " ".join(f"{key} {value}" for key, value in result.items()), flush=True)

    try:
        database.start()
        url = database.create("keyed")
        run_async(run(url, database.pgdata, args.seconds, args.callers, args.no_database, not args.unkeyed,
                      windows=max(1, args.windows), report=report, io=args.io))
    finally:
        database.close()


if __name__ == "__main__":
    main()
