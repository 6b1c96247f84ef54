"""`python -m perf.ceiling [--quick] [--concurrency N]`: the bare ceiling of issue 4.

What the machine allows for a durable transfer through this design with no business
logic at all: the same actor hand-offs as an engine transfer (caller on the event loop
-> source account actor -> target account actor -> writer, as pykka messages through
the project's own runtime `actors/runtime.py`, on the event loop like the engine's) and the same rows written per transfer (two `entries` rows, two outbox
`events` rows, and each touched account's new balance and version once per batch),
with asyncpg's `copy_records_to_table` inside one transaction per batch, the batch
being everything waiting up to `batch_size_max` (as the engine's writer takes it).
Replies after COMMIT. No validation, idempotency, admission, funds check or
notification of the actors.

It is an optimistic ceiling: COPY cannot update, so the account rows are appended to a
`ceiling_account_states` table instead of updating `accounts` in place.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import sys
import time
from datetime import datetime, timezone

from perf.common import (SETUP_TIMEOUT_S, ProgressBar, RunConfig, Session, Snapshot, add_window_arguments,
                         cpu_sample, drive, resolve_window, run_async, run_main, summarize, Database)
from perf.workloads import ACCOUNTS, INITIAL_BALANCE_CENTS, TRANSFERS, WORKLOADS, Workload

ENTRY_COLUMNS = ("id", "account_id", "sequence", "kind", "direction", "amount", "balance_after",
                 "counterparty_account_id", "correlation_id", "effective_date", "created_at")
EVENT_COLUMNS = ("type", "account_id", "correlation_id", "payload", "created_at")
STATE_COLUMNS = ("id", "balance", "version", "updated_at")
CREATE_STATES = """CREATE TABLE ceiling_account_states (
    id text NOT NULL, balance bigint NOT NULL, version bigint NOT NULL, updated_at timestamptz NOT NULL,
    PRIMARY KEY (id, version))"""
INSERT_ACCOUNTS = """INSERT INTO accounts (id, name, type, status, owner, balance, version, opened_on, created_at,
    updated_at) SELECT id, 'ceiling-' || id, 'revenue', 'active', 'perf', $2, 0, $3, $4, $4
    FROM unnest($1::text[]) AS id"""


class Debit:
    __slots__ = ("target", "amount", "transfer_id", "at", "reply")

    def __init__(self, target, amount, transfer_id, at, reply):
        self.target, self.amount, self.transfer_id, self.at, self.reply = target, amount, transfer_id, at, reply


class Credit:
    __slots__ = ("debit", "source_id", "leg", "state")

    def __init__(self, debit, source_id, leg, state):
        self.debit, self.source_id, self.leg, self.state = debit, source_id, leg, state


def _account_actor_class():
    from actors.runtime import PooledActor

    class CeilingAccount(PooledActor):
        """Keeps a balance and a version (the entries' sequence), checks nothing."""

        def __init__(self, pool, account_id: str, balance: int, submit):
            super().__init__(pool)
            self.account_id, self.balance, self.version, self.submit = account_id, balance, 0, submit

        def on_receive(self, message):
            self.version += 1
            if type(message) is Debit:
                self.balance -= message.amount
                leg = (f"{message.transfer_id}_d", self.account_id, self.version, "transfer", "debit", message.amount,
                       self.balance, None, message.transfer_id, message.at.date(), message.at)
                message.target.tell(Credit(message, self.account_id, leg,
                                           (self.account_id, self.balance, self.version, message.at)))
                return
            debit = message.debit
            self.balance += debit.amount
            leg = (f"{debit.transfer_id}_c", self.account_id, self.version, "transfer", "credit", debit.amount,
                   self.balance, message.source_id, debit.transfer_id, debit.at.date(), debit.at)
            self.submit((message.leg, leg, message.state, (self.account_id, self.balance, self.version, debit.at),
                         debit.reply))

    return CeilingAccount


class CopyWriter:
    """One asyncio task on the callers' loop, fed from actor threads the way the
    engine's writer is (a deque and one loop wake-up per burst), committing everything
    waiting (up to `batch_size_max`) with COPY in one transaction per batch."""

    def __init__(self, connection, batch_size_max: int):
        self.connection, self.batch_size_max = connection, batch_size_max
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._inbox: collections.deque = collections.deque()
        self._wakeup_pending = False
        self.batches = self.operations = 0
        self.commit_s = 0.0
        self.task = asyncio.create_task(self._run(), name="ceiling-writer")

    def submit(self, item) -> None:   # any thread
        self._inbox.append(item)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._wakeup_pending = False
        while self._inbox:
            self.queue.put_nowait(self._inbox.popleft())

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.batch_size_max and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            started = time.perf_counter()
            try:
                await self._write(batch)
            except Exception as error:  # noqa: BLE001 - every caller of the batch learns it
                for *_, reply in batch:
                    if not reply.done():
                        reply.set_exception(error)
                continue
            self.commit_s += time.perf_counter() - started
            self.batches += 1
            self.operations += len(batch)
            for *_, reply in batch:
                if not reply.done():
                    reply.set_result(None)

    async def _write(self, batch) -> None:
        entries, events, states = [], [], {}
        for debit_leg, credit_leg, debit_state, credit_state, _ in batch:
            for leg in (debit_leg, credit_leg):
                entries.append(leg)
                events.append(("transaction.posted", leg[1], leg[8],
                               f'{{"id":"{leg[0]}","account_id":"{leg[1]}","amount":{leg[5]},'
                               f'"direction":"{leg[4]}","balance_after":{leg[6]}}}', leg[10]))
            for state in (debit_state, credit_state):
                if states.get(state[0], (None, None, -1))[2] < state[2]:
                    states[state[0]] = state
        async with self.connection.transaction():
            await self.connection.copy_records_to_table("entries", records=entries, columns=ENTRY_COLUMNS)
            await self.connection.copy_records_to_table("events", records=events, columns=EVENT_COLUMNS)
            await self.connection.copy_records_to_table("ceiling_account_states", records=list(states.values()),
                                                        columns=STATE_COLUMNS)

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


async def ceiling_session(url: str, pgdata: str | None, runs: list[tuple[Workload, int]], window: RunConfig,
                          repeats: int, bar: ProgressBar) -> Session:
    """Every (workload, callers) of `runs`, `repeats` times, on one database."""
    import asyncpg

    from actors.api import Engine
    from actors.runtime import ActorPool
    from actors.settings import load_settings

    settings = load_settings({}, {"database": {"url": url}, "engine": {"reinvest_schedule": False}})
    async with Engine(settings):
        pass   # our schema, from our migrations
    connection = await asyncpg.connect(url)
    pool = ActorPool(asyncio.get_running_loop(), name="ceiling")
    writer = None
    try:
        now = datetime.now(timezone.utc)
        ids = [f"acc_ceiling_{index:07d}" for index in range(ACCOUNTS)]
        await asyncio.wait_for(connection.execute(INSERT_ACCOUNTS, ids, INITIAL_BALANCE_CENTS, now.date(), now),
                               SETUP_TIMEOUT_S)
        await connection.execute(CREATE_STATES)
        writer = CopyWriter(connection, settings.engine.batch_size_max)
        account_class = _account_actor_class()
        refs = [account_class.start(pool, account_id, INITIAL_BALANCE_CENTS, writer.submit) for account_id in ids]
        numbers = itertools.count()
        loop = asyncio.get_running_loop()

        async def call(source: int, target: int, amount: int) -> str | None:
            reply = loop.create_future()
            refs[source].tell(Debit(refs[target], amount, f"xfr_ceiling_{next(numbers)}",
                                    datetime.now(timezone.utc), reply))
            try:
                await reply
                return None
            except Exception as error:  # noqa: BLE001 - counted, reported by type
                return type(error).__name__

        async def snapshot() -> Snapshot:
            return {"batches": writer.batches, "operations": writer.operations, "commits": writer.batches,
                    "commit_s": writer.commit_s, "cpu": cpu_sample(own="engine", pgdata=pgdata)}

        results, acknowledged = [], 0
        for _ in range(repeats):
            for workload, concurrency in runs:
                config = RunConfig(concurrency=concurrency, warmup_s=window.warmup_s, seconds=window.seconds)
                measurement = await drive(call, workload.pick, config, snapshot)
                acknowledged += measurement.acknowledged_total
                results.append(summarize("ceiling", workload.name, config, measurement))
                bar.advance(f"ceiling {workload.name} x{concurrency}: {results[-1].per_second:,.0f}/s")
        await writer.stop()
        legs = await connection.fetchval("SELECT count(*) FROM entries WHERE kind = 'transfer'")
        check = {"transfer_legs": legs, "acknowledged_transfers": acknowledged, "ok": legs >= 2 * acknowledged,
                 "problems": [] if legs >= 2 * acknowledged else ["acknowledged ceiling transfers missing"]}
        return Session(results, check)
    finally:
        if writer is not None:
            await writer.stop()
        pool.stop()
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.ceiling", description=__doc__.split("\n\n")[0])
    add_window_arguments(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    resolve_window(parser, args)
    window = RunConfig(warmup_s=args.warmup, seconds=args.seconds)
    runs = [(WORKLOADS[name], level) for name in TRANSFERS for level in args.concurrency]

    def body() -> int:
        with Database() as database, ProgressBar(len(runs), "ceiling") as bar:
            url = database.create("ceiling")
            session = run_async(ceiling_session(url, database.pgdata, runs, window, 1, bar), args.loop)
        results, check = session.results, session.check
        for r in results:
            print(f"{r.workload:<18} x{r.concurrency:<5} {r.per_second:>10,.0f} transfers/s  p99 {r.p99_ms} ms  "
                  f"avg batch {r.avg_batch_size}")
        print("check:", "ok" if check["ok"] else check["problems"])
        return 0 if check["ok"] else 1

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
