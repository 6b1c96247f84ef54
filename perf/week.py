"""The mixed "ALL-USE week": the strategy engine, embedded in-process, books a week's
trade results for thousands of portfolios while operators read.

Set-up: `portfolios` root portfolios ($300,000 each; every tenth one $10,000,000, so its
Gen-Acc's weekly premium crosses the $50,000 fork threshold and forks every week). One
week's results per portfolio: a premium on each account at its type's weekly target
(Gen-Acc 1.5%, Rev-Acc 1.0%, Com-Acc 0.5% of its opening balance), a fee on the Gen-Acc,
and a loss on every fifth Rev-Acc. 64 booking callers take the week's trades in order,
one after another, round after round, for the measured window.

Two runs, each one window, with the same gateway configuration as every benchmark
(`perf.common.gateway_config`, served by this process on 127.0.0.1 so that HTTP
operators reach the very engine that books):
* bookings while 16 operators read in-process (`get_account`, `get_portfolio`);
* bookings while 16 operators read over HTTP from the load-generator process
  (GET /v1/accounts/{id}, GET /v1/portfolios/{id}), the two windows opening together.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from dataclasses import replace

from perf.common import (HOST, SETUP_TIMEOUT_S, Database, ProgressBar, Result, RunConfig, Session, bounded_gather,
                         cpu_sample, drive, free_port, progress, run_async, summarize, write_gateway_config)

WEEK_RUNS = 2
BOOKERS = 64
READERS = 16
CAPITAL_CENTS = 300_000_00
LARGE_CAPITAL_CENTS = 10_000_000_00
LARGE_EVERY = 10
WEEKLY_PREMIUM_BPS = {"generation": 150, "revenue": 100, "compounding": 50}
FEE_BPS = 2
LOSS_BPS = 30
LOSS_EVERY = 5
HTTP_READERS_START_S = 4.0     # time for the load generator to spawn and import before the windows open


def week_trades(portfolios) -> list[tuple[str, str, int]]:
    """(account id, kind, amount) of one week, portfolio after portfolio."""
    trades = []
    for index, portfolio in enumerate(portfolios):
        accounts = {account.type: account for account in portfolio.accounts}
        for account_type, bps in WEEKLY_PREMIUM_BPS.items():
            account = accounts[account_type]
            trades.append((account.id, "premium", account.balance * bps // 10_000))
        trades.append((accounts["generation"].id, "fee", max(1, accounts["generation"].balance * FEE_BPS // 10_000)))
        if index % LOSS_EVERY == 0:
            trades.append((accounts["revenue"].id, "loss", accounts["revenue"].balance * LOSS_BPS // 10_000))
    return trades


def week_session(database: Database, portfolios: int, window: RunConfig, repeats: int, bar: ProgressBar,
                 loop: str) -> Session:
    return run_async(_week(database, database.create("week"), portfolios, window, repeats, bar, loop), loop)


async def _week(database: Database, url: str, portfolios: int, window: RunConfig, repeats: int,
                bar: ProgressBar, loop: str) -> Session:
    from aiohttp import web

    from actors.api import Engine
    from actors.settings import load_settings
    from gateway.app import create_app
    from perf.checks import verify_ledger

    port, token = free_port(), secrets.token_urlsafe(24)
    config_path = write_gateway_config(database.tmp, port=port, database_url=url,
                                       data_dir=str(database.tmp / "week-data"))
    settings = load_settings({"ALLUSE_CONFIG": str(config_path), "ALLUSE_ADMIN_TOKEN": token})
    results: list[Result] = []
    booked = 0
    async with Engine(settings) as engine:
        runner = web.AppRunner(create_app(settings, engine), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        try:
            views = await _open_portfolios(engine, portfolios)
            trades = week_trades(views)
            week = Week(engine, views, trades, database.pgdata, loop)
            for _ in range(repeats):
                for run in (week.with_readers_in_process, week.with_readers_over_http):
                    rows = await run(window, f"http://{HOST}:{port}", token)
                    booked += rows[0].acknowledged_total
                    results.extend(rows)
                    bar.advance(f"{rows[0].workload}: {rows[0].per_second:,.0f} trades/s")
        finally:
            await runner.cleanup()
    check = await verify_ledger(url, {"trade_entries": booked})
    large = len(range(0, portfolios, LARGE_EVERY))
    return Session(results, check, {"portfolios": portfolios, "trades_per_week": len(trades),
                                    "forks_per_week": large, "bookers": BOOKERS, "readers": READERS})


async def _open_portfolios(engine, count: int) -> list:
    progress(f"week: opening {count:,} portfolios")

    async def open_one(index: int):
        capital = LARGE_CAPITAL_CENTS if index % LARGE_EVERY == 0 else CAPITAL_CENTS
        return await engine.create_portfolio(name=f"week-{index}", owner=f"owner-{index % 100}",
                                             initial_capital=capital)

    return await asyncio.wait_for(bounded_gather(count, 64, open_one), SETUP_TIMEOUT_S)


class Week:
    def __init__(self, engine, portfolios, trades, pgdata, loop: str):
        self.engine, self.pgdata, self.loop = engine, pgdata, loop
        self.accounts = [account.id for view in portfolios for account in view.accounts]
        self.portfolios = [view.id for view in portfolios]
        self.next_trade = itertools.cycle(trades).__next__
        self.client_pid: int | None = None   # the load generator's, while HTTP operators read

    def _book(self):
        from engine.errors import EngineError

        engine = self.engine

        async def book(account_id: str, kind: str, amount: int) -> str | None:
            try:
                await engine.book_trade(account_id, kind=kind, amount=amount)
                return None
            except EngineError as error:
                return error.code

        return book

    async def _snapshot(self):
        return {"batches": self.engine.writer.batches, "operations": self.engine.writer.operations,
                "cpu": cpu_sample(own="engine", pids={"client": self.client_pid} if self.client_pid else None,
                                  pgdata=self.pgdata)}

    async def _snapshot_cpu(self):
        return {"cpu": cpu_sample(own="engine", pgdata=self.pgdata)}

    def _pick_trade(self, _rng: random.Random) -> tuple:
        return self.next_trade()

    async def with_readers_in_process(self, window: RunConfig, _base: str, _token: str) -> list[Result]:
        from engine.errors import EngineError

        engine = self.engine

        async def read(kind: str, identifier: str) -> str | None:
            try:
                await (engine.get_account(identifier) if kind == "account" else engine.get_portfolio(identifier))
                return None
            except EngineError as error:
                return error.code

        def pick(rng: random.Random) -> tuple:
            if rng.random() < 0.5:
                return "account", rng.choice(self.accounts)
            return "portfolio", rng.choice(self.portfolios)

        start_at = time.monotonic() + 0.1
        books, reads = replace(window, concurrency=BOOKERS), replace(window, concurrency=READERS)
        booked, read_ = await asyncio.gather(
            drive(self._book(), self._pick_trade, books, self._snapshot, start_at=start_at),
            drive(read, pick, reads, self._snapshot_cpu, start_at=start_at))
        return [summarize("week", "week-bookings+in-process-reads", books, booked),
                summarize("week", "week-reads-in-process", reads, read_)]

    async def with_readers_over_http(self, window: RunConfig, base: str, token: str) -> list[Result]:
        import os

        from perf.loadgen import LoadGenerator

        start_at = time.monotonic() + HTTP_READERS_START_S
        spec = {"task": "readers", "base": base, "token": token, "server_pid": os.getpid(), "pgdata": self.pgdata,
                "loop": self.loop, "concurrency": READERS, "start_at": start_at, "workload": "week-reads-http",
                "window": {"warmup_s": window.warmup_s, "seconds": window.seconds},
                "accounts": self.accounts, "portfolios": self.portfolios}
        books = replace(window, concurrency=BOOKERS)
        with LoadGenerator(spec) as generator:
            self.client_pid = generator.process.pid
            booked = await drive(self._book(), self._pick_trade, books, self._snapshot, start_at=start_at)
            messages = await asyncio.to_thread(lambda: list(generator.messages()))
        self.client_pid = None
        reads = Result(**next(m["result"] for m in messages if "result" in m))
        reads.mode, reads.avg_batch_size, reads.avg_commit_ms = "week", None, None   # the bookings' batches
        return [summarize("week", "week-bookings+http-reads", books, booked), reads]
