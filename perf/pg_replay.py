"""What PostgreSQL spends per keyed transfer, and on what, without the engine's noise.

    .venv/bin/python -m perf.pg_replay [--batches 800] [--rounds 2] [VARIANT ...]

An in-process `Engine` on a fresh embedded PostgreSQL opens and funds 1,000 accounts;
the database is copied (`CREATE DATABASE ... TEMPLATE`), and then 64 callers send keyed
transfers while the writer's batches are recorded (their statement's parameters, as
sent). Each variant then replays the recorded batches in order, one statement after
another on one connection of the writer's session settings, on its own fresh copy of
the funded database, and prints the CPU of that connection's backend per transfer (from
/proc) and the wall time per transfer. Rounds alternate the variants (A B C A B C), so
a change of the machine's speed shows as a difference between rounds, not variants.

With the engine out of the way, the backend's CPU per transfer repeats within ~5%
between rounds, where `perf.keyed` moves ±10-20% from run to run. It reads as the
live figure does (~50 µs at the batch size the engine forms at 64 callers).

Variants (default: all of them, each once per round):
- `current`: the writer's statement as it is.
- `pairs`: every two consecutive batches as one: what the batch size is worth.
- `no_entries_id`, `no_correlation`, `no_keys_brin`: without that index (experiments:
  the engine's reads use the first two, the key purge the third).
- `no_keys`, `no_audit`: without the batch's idempotency keys or audit records
  (experiments: what each costs).
- `no_checks`: without the CHECK constraints of the tables a batch writes (an
  experiment: the money invariants rest on some of them).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import urllib.parse
import uuid

from perf.common import Database, _proc_cpu_s
from perf.keyed import funded_accounts

CALLERS = 64


def _url(database: Database, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(database.url)._replace(path="/" + name))


def _pairs(recorded: list[tuple]) -> list[tuple]:
    """Two consecutive batches as one: accounts updated by both are updated once, from the
    version the first found to the state the second left."""
    merged = []
    for first, second in zip(recorded[::2], recorded[1::2]):
        updates = {row[0]: row for row in json.loads(first[0])}
        for row in json.loads(second[0]):
            if row[0] in updates:
                row = [*row[:5], updates[row[0]][5], *row[6:]]
            updates[row[0]] = row
        joined = [json.dumps(json.loads(a) + json.loads(b)) for a, b in zip(first[1:4], second[1:4])]
        merged.append((json.dumps(list(updates.values())), *joined, [*first[4], *second[4]],
                       json.dumps(json.loads(first[5]) + json.loads(second[5])), len(updates)))
    return merged


def _without(position: int):
    return lambda args: (*args[:position], "[]", *args[position + 1:])


# name: (statements run first on the copy, the batches' parameters from the recorded ones)
VARIANTS = {
    "current": ((), None),
    "pairs": ((), "pairs"),
    "no_entries_id": (("DROP INDEX entries_id",), None),
    "no_correlation": (("DROP INDEX entries_correlation_id",), None),
    "no_keys_brin": (("DROP INDEX idempotency_keys_created_at",), None),
    "no_keys": ((), _without(1)),
    "no_audit": ((), _without(5)),
    "no_checks": (("ALTER TABLE accounts DROP CONSTRAINT accounts_type_check, DROP CONSTRAINT accounts_status_check, "
                   "DROP CONSTRAINT accounts_balance_check, DROP CONSTRAINT accounts_baseline_check, "
                   "DROP CONSTRAINT accounts_version_check",
                   "ALTER TABLE entries DROP CONSTRAINT entries_direction_check, DROP CONSTRAINT entries_amount_check, "
                   "DROP CONSTRAINT entries_balance_after_check",
                   "ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_answer",
                   "ALTER TABLE events DROP CONSTRAINT events_payload_or_entries"), None),
}


async def _record(database: Database, batches: int) -> list[tuple]:
    from actors.api import Engine
    from actors.settings import load_settings
    from persistence import store

    import asyncpg

    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute("CREATE DATABASE replay_source")
        settings = load_settings({}, {"database": {"url": _url(database, "replay_source")},
                                      "engine": {"reinvest_schedule": False}})
        async with Engine(settings) as engine:
            ids = await funded_accounts(engine, "replay")
        await admin.execute("CREATE DATABASE replay_funded TEMPLATE replay_source")
    finally:
        await admin.close()
    recorded: list[tuple] = []
    write_batch = store.write_batch

    async def recording(connection, batch) -> None:
        if batch.rare is None and len(recorded) < batches:
            recorded.append(batch.args())
        await write_batch(connection, batch)

    async with Engine(settings) as engine:
        store.write_batch = recording
        try:
            rng = random.Random(7)

            async def caller() -> None:
                while len(recorded) < batches:
                    a, b = rng.sample(ids, 2)
                    await engine.transfer(a, b, rng.randint(1, 100), idempotency_key=str(uuid.uuid4()))

            await asyncio.gather(*(caller() for _ in range(CALLERS)))
        finally:
            store.write_batch = write_batch
    return recorded


async def _replay(database: Database, name: str, copy: str, recorded: list[tuple], transfers: int) -> dict:
    import asyncpg

    from persistence import store

    setup, convert = VARIANTS[name]
    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute(f"CREATE DATABASE {copy} TEMPLATE replay_funded")
        connection = await asyncpg.connect(_url(database, copy), server_settings=store.WRITER_SETTINGS)
        try:
            for statement in setup:
                await connection.execute(statement)
            batches = _pairs(recorded) if convert == "pairs" else [convert(a) if convert else a for a in recorded]
            pid = await connection.fetchval("SELECT pg_backend_pid()")
            await connection.execute("CHECKPOINT")
            cpu, wall = _proc_cpu_s(pid), time.perf_counter()
            for args in batches:
                await connection.fetchval(store.WRITE_BATCH, *args)
            cpu, wall = _proc_cpu_s(pid) - cpu, time.perf_counter() - wall
        finally:
            await connection.close()
        await admin.execute(f"DROP DATABASE {copy}")
    finally:
        await admin.close()
    return {"variant": name, "backend_us": round(cpu / transfers * 1e6, 1),
            "wall_us": round(wall / transfers * 1e6, 1), "batch": round(transfers / len(batches), 1)}


async def run(database: Database, batches: int, rounds: int, variants: list[str]) -> None:
    recorded = await _record(database, batches)
    transfers = sum(len(json.loads(args[1])) for args in recorded)   # one key per keyed transfer
    print(f"recorded {len(recorded)} batches of {transfers / len(recorded):.1f} keyed transfers", flush=True)
    for round_ in range(rounds):
        for name in variants:
            result = await _replay(database, name, f"replay_{name}_{round_}", recorded, transfers)
            print(f"round {round_} {result['variant']:15} backend {result['backend_us']:5.1f} µs/transfer  "
                  f"wall {result['wall_us']:5.1f} µs/transfer  batch {result['batch']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=", ".join(VARIANTS))
    arguments = parser.parse_args()
    unknown = sorted(set(arguments.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    variants = arguments.variants or list(VARIANTS)
    database = Database()
    try:
        database.start()
        asyncio.run(run(database, arguments.batches, arguments.rounds, variants))
    finally:
        database.close()


if __name__ == "__main__":
    main()
