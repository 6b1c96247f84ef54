"""The engine as a benchmark target, two ways: `EngineTarget` calls an embedded
`actors.api.Engine` in this process; `HttpTarget` calls the gateway over keep-alive
connections (it runs in the load-generator process). Both set up the same accounts and
map a workload's picks (`perf.workloads`) onto one call that answers None when the
operation was acknowledged (that is, committed) and an error code otherwise.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any

from perf.common import SETUP_TIMEOUT_S, Call, Snapshot, bounded_gather, cpu_sample, parse_metrics, progress
from perf.workloads import (ACCOUNTS, INITIAL_BALANCE_CENTS, PORTFOLIO_CAPITAL_CENTS, PORTFOLIOS_FORKING,
                            PREMIUM_FORKING_CENTS, TRADE_KINDS, Workload)

SETUP_CONCURRENCY = 64
# A trade's loss or fee queues its account's drawdown check, which reads the account's
# weekly sums (`persistence/ledger_weeks.py`): the first read of an account after the
# engine starts sums its whole ledger, later ones fold in only the entries since. The
# trades runs come after the transfer runs have written hundreds of entries per account,
# so without this their short windows would measure mostly those one-time first reads
# (PostgreSQL 185-230 µs per trade instead of ~60); a long-running engine pays them
# once per account. So each account's sums are read once before the first trades run.
WARM_WEEKS_WHY = "reading each account's weekly sums once before the trades runs (its first drawdown check would)"


def _keys():
    """Unique idempotency keys, cheap to make (the in-process driver's CPU counts as the
    engine's): a random prefix per run and a counter."""
    prefix = os.urandom(8).hex()
    return (f"{prefix}-{n}" for n in itertools.count())


class EngineTarget:
    """An embedded `Engine`: `accounts` funded standalone Rev-Accs; `generation` the
    Gen-Accs of the portfolios the fork-heavy workload credits."""

    def __init__(self, engine, pgdata: str | None):
        self.engine = engine
        self.pgdata = pgdata
        self.accounts: list[str] = []
        self.generation: list[str] = []
        self._names = itertools.count()
        self._warm = False

    async def setup(self, *, portfolios: bool) -> None:
        engine = self.engine

        async def create(index: int) -> str:
            account = await engine.create_account(name=f"bench-{index}", type="revenue", owner="perf")
            await engine.deposit(account.id, INITIAL_BALANCE_CENTS)
            return account.id

        progress(f"in-process: creating and funding {ACCOUNTS:,} accounts")
        self.accounts = await asyncio.wait_for(bounded_gather(ACCOUNTS, SETUP_CONCURRENCY, create), SETUP_TIMEOUT_S)
        if portfolios:
            progress(f"in-process: opening {PORTFOLIOS_FORKING:,} portfolios for the fork-heavy workload")

            async def open_portfolio(index: int) -> str:
                view = await engine.create_portfolio(name=f"fork-{index}", owner="perf",
                                                     initial_capital=PORTFOLIO_CAPITAL_CENTS)
                return next(a.id for a in view.accounts if a.type == "generation")

            self.generation = await asyncio.wait_for(
                bounded_gather(PORTFOLIOS_FORKING, SETUP_CONCURRENCY, open_portfolio), SETUP_TIMEOUT_S)

    async def prepare(self, workload: Workload) -> None:
        """Before the first trades run: each account's weekly sums read once
        (why: `WARM_WEEKS_WHY`)."""
        if workload.operation == "trade" and not self._warm:
            self._warm = True
            progress(f"in-process: {WARM_WEEKS_WHY}")
            await asyncio.wait_for(bounded_gather(
                len(self.accounts), SETUP_CONCURRENCY, lambda i: self.engine.account_analytics(self.accounts[i])),
                SETUP_TIMEOUT_S)

    def call(self, workload: Workload) -> Call:
        from engine.errors import EngineError

        engine, ids, generation, names = self.engine, self.accounts, self.generation, self._names
        keys = _keys() if workload.keyed else itertools.repeat(None)
        operation = {
            "transfer": lambda source, target, amount: engine.transfer(ids[source], ids[target], amount,
                                                                       idempotency_key=next(keys)),
            "deposit": lambda account, amount: engine.deposit(ids[account], amount, idempotency_key=next(keys)),
            "trade": lambda account, amount, kind: engine.book_trade(ids[account], kind=TRADE_KINDS[kind], amount=amount,
                                                                     idempotency_key=next(keys)),
            "read": lambda account: engine.get_account(ids[account]),
            "create": lambda: engine.create_account(name=f"new-{next(names)}", type="revenue", owner="perf"),
            "fork": lambda portfolio: engine.book_trade(generation[portfolio], kind="premium",
                                                        amount=PREMIUM_FORKING_CENTS, idempotency_key=next(keys)),
        }[workload.operation]

        async def call(*args) -> str | None:
            try:
                await operation(*args)
                return None
            except EngineError as error:
                return error.code
            except Exception as error:  # noqa: BLE001 - counted, reported by type
                return type(error).__name__

        return call

    async def snapshot(self) -> Snapshot:
        from prometheus_client import generate_latest

        metrics = parse_metrics(generate_latest(self.engine.metrics.registry).decode())
        return {"batches": self.engine.writer.batches, "operations": self.engine.writer.operations,
                "commits": metrics.get("alluse_commit_latency_seconds_count", 0.0),
                "commit_s": metrics.get("alluse_commit_latency_seconds_sum", 0.0),
                "cpu": cpu_sample(own="engine", pgdata=self.pgdata)}


class HttpTarget:
    """The gateway at `base`, from the load-generator process: one aiohttp session per
    run with as many keep-alive connections as callers; /metrics on a side session so
    it never waits behind the load."""

    def __init__(self, base: str, token: str, server_pid: int | None, pgdata: str | None):
        import aiohttp

        self.aiohttp = aiohttp
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.timeout = aiohttp.ClientTimeout(total=30.0)
        self.server_pid, self.pgdata = server_pid, pgdata
        self.session = None
        self.side = aiohttp.ClientSession(timeout=self.timeout)
        self.accounts: list[str] = []
        self.encode = json.JSONEncoder(separators=(",", ":")).encode
        self._names = itertools.count()
        self._warm = False

    async def open(self, concurrency: int) -> None:
        await self.close_session()
        connector = self.aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        self.session = self.aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers=self.headers)

    async def close_session(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def close(self) -> None:
        await self.close_session()
        await self.side.close()

    async def _post(self, path: str, body: dict) -> Any:
        async with self.session.post(self.base + path, data=self.encode(body)) as response:
            payload = await response.read()
            if response.status != 201:
                raise RuntimeError(f"POST {path}: HTTP {response.status}: {payload[:300]!r}")
            return json.loads(payload)

    async def setup(self) -> None:
        async def create(index: int) -> str:
            account = await self._post("/v1/accounts", {"name": f"bench-{index}", "type": "revenue", "owner": "perf"})
            await self._post(f"/v1/accounts/{account['id']}/deposits", {"amount": INITIAL_BALANCE_CENTS})
            return account["id"]

        progress(f"http: creating and funding {ACCOUNTS:,} accounts")
        await self.open(SETUP_CONCURRENCY)
        self.accounts = await asyncio.wait_for(bounded_gather(ACCOUNTS, SETUP_CONCURRENCY, create), SETUP_TIMEOUT_S)

    async def prepare(self, workload: Workload) -> None:
        """Before the first trades run: each account's weekly sums read once
        (why: `WARM_WEEKS_WHY`), through each account's analytics."""
        if workload.operation == "trade" and not self._warm:
            self._warm = True
            progress(f"http: {WARM_WEEKS_WHY}")

            async def read(index: int) -> None:
                async with self.session.get(f"{self.base}/v1/accounts/{self.accounts[index]}/analytics") as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"analytics of {self.accounts[index]}: HTTP {response.status}")

            await asyncio.wait_for(bounded_gather(len(self.accounts), SETUP_CONCURRENCY, read), SETUP_TIMEOUT_S)

    def request(self, workload: Workload):
        """(method, url, body) for one pick; the expected status follows from the method."""
        ids, base, encode, names = self.accounts, self.base, self.encode, self._names
        return {
            "transfer": lambda source, target, amount: (
                "POST", base + "/v1/transfers",
                encode({"from_account": ids[source], "to_account": ids[target], "amount": amount})),
            "deposit": lambda account, amount: (
                "POST", f"{base}/v1/accounts/{ids[account]}/deposits", encode({"amount": amount})),
            "trade": lambda account, amount, kind: (
                "POST", f"{base}/v1/accounts/{ids[account]}/trades",
                encode({"kind": TRADE_KINDS[kind], "amount": amount})),
            "read": lambda account: ("GET", f"{base}/v1/accounts/{ids[account]}", None),
            "create": lambda: ("POST", base + "/v1/accounts",
                               encode({"name": f"new-{next(names)}", "type": "revenue", "owner": "perf"})),
        }[workload.operation]

    def call(self, workload: Workload) -> Call:
        return self.call_requests(self.request(workload), keyed=workload.keyed)

    def call_requests(self, make, *, keyed: bool = False) -> Call:
        aiohttp = self.aiohttp
        keys = _keys()

        async def call(*args) -> str | None:
            method, url, body = make(*args)
            expected = 201 if method == "POST" else 200
            headers = {"Idempotency-Key": next(keys)} if keyed else None
            try:
                async with self.session.request(method, url, data=body, headers=headers) as response:
                    payload = await response.read()
                    if response.status == expected:
                        return None
                try:
                    code = json.loads(payload)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "unparsed"
                return f"{response.status} {code}"
            except asyncio.TimeoutError:
                return "client_timeout"
            except aiohttp.ClientError as error:
                return type(error).__name__

        return call

    async def cpu_snapshot(self) -> Snapshot:
        """CPU only: for a server with no /metrics (the hello world)."""
        pids = {"engine": self.server_pid} if self.server_pid else {}
        return {"cpu": cpu_sample(own="client", pids=pids, pgdata=self.pgdata)}

    async def snapshot(self) -> Snapshot:
        async with self.side.get(self.base + "/metrics") as response:
            metrics = parse_metrics(await response.text())
        pids = {"engine": self.server_pid} if self.server_pid else {}
        return {"batches": metrics.get("alluse_batch_size_count", 0.0),
                "operations": metrics.get("alluse_batch_size_sum", 0.0),
                "commits": metrics.get("alluse_commit_latency_seconds_count", 0.0),
                "commit_s": metrics.get("alluse_commit_latency_seconds_sum", 0.0),
                "cpu": cpu_sample(own="client", pids=pids, pgdata=self.pgdata)}
