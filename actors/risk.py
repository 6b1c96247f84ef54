"""Risk: the live `drawdown_breach` flag of every account.

The decision is pure (`engine.analytics.current_drawdown`, `engine.analytics.breached`);
this part keeps the flags in memory (loaded at start and after the database comes back),
decides when an account is checked, and sets or clears a flag through the writer, the
only writer, so the flag and its event (`account.drawdown_breach`,
`account.drawdown_recovered`) commit in order with the batches around them.

Only a loss or a fee can deepen a drawdown and a premium can end a breach, so a trade
queues a check (`after_trade`) and so does a merge of a flagged account. Queued accounts
are checked by at most CHECKERS tasks, each account once however many losses and fees it
took meanwhile (a check reads the account's weekly sums: from memory once the account has
been read, as the writer keeps them current, decision 91): a task per trade let the
checks' ledger reads crowd the connection pool and PostgreSQL while the strategy engine
booked at full speed, and operators' reads waited behind them (the ALL-USE week: p99 of
portfolio reads over HTTP ~1 s; decision 83)."""
from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING

from engine import analytics
from engine.errors import EngineError
from actors.account import Reply
from persistence.writer import FlagOp

if TYPE_CHECKING:
    from actors.api import Engine

log = logging.getLogger("alluse.risk")

# Tasks checking queued accounts at once, and accounts one check reads together.
CHECKERS = 2
CHECK_BATCH_MAX = 64


class DrawdownFlags:
    def __init__(self, engine: "Engine"):
        self._engine = engine
        # Flagged accounts, with the drawdown that set the flag.
        self.flags: dict[str, float] = {}
        # Accounts to check (an ordered set), and the tasks checking them.
        self.due: dict[str, None] = {}
        self.checkers = 0
        # One check at a time per account; a lock lives while someone holds or awaits it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def load(self) -> None:
        """The flags as committed (at start, and when the database comes back)."""
        self.flags = await self._engine.store.risk_flags()

    def breaches(self) -> dict[str, float]:
        """Accounts whose flag is set, with the drawdown that set it."""
        return dict(self.flags)

    def after_trade(self, account_id: str, kind: str) -> None:
        if kind != "premium" or account_id in self.flags:
            self.queue(account_id)

    def after_merge(self, account_ids) -> None:
        """A merged account's flag goes."""
        for account_id in account_ids:
            if account_id in self.flags:
                self.queue(account_id)

    def queue(self, account_id: str) -> None:
        """Checks the account's flag soon, after what has been booked so far."""
        self.due[account_id] = None
        if self.checkers < CHECKERS:
            self.checkers += 1
            self._engine._in_background(self._checker())

    async def _checker(self) -> None:
        try:
            due = self.due
            while due:
                batch = []
                while due and len(batch) < CHECK_BATCH_MAX:
                    account_id = next(iter(due))
                    del due[account_id]
                    batch.append(account_id)
                try:
                    await self.check_many(batch)
                except Exception:  # noqa: BLE001 - a bug in one check must not strand the queue
                    log.exception("drawdown checks of %s failed", ", ".join(batch))
        finally:
            self.checkers -= 1

    async def check(self, account_id: str) -> None:
        """Checks one account now (`check_many`)."""
        await self.check_many([account_id])

    async def check_many(self, account_ids: list[str]) -> None:
        """Sets an account's flag (with one event) when its current drawdown over its
        whole history reaches its type's limit, clears it (with one event) when it is back
        under it or the account is closed or merged. The accounts' ledgers are read in one
        query (a query per account cost more than the check itself under a stream of
        losses), inside each account's lock (taken in id order), so checks never act on
        stale data; an account whose flag stays is released before the flags that change
        are written. An account that cannot be read is skipped (its next loss or fee
        queues it again)."""
        engine = self._engine
        ids = sorted(set(account_ids))
        locks = []
        for account_id in ids:
            lock = self._locks.get(account_id)
            if lock is None:
                lock = self._locks[account_id] = asyncio.Lock()
            locks.append(lock)
        acquired = []
        try:
            for lock in locks:
                await lock.acquire()
                acquired.append(lock)
            accounts = {}
            read = await asyncio.gather(*(engine.get_account(account_id) for account_id in ids),
                                        return_exceptions=True)
            for account_id, account in zip(ids, read):
                if isinstance(account, EngineError):
                    log.warning("drawdown check of %s skipped: %s", account_id, account.message)
                elif isinstance(account, BaseException):
                    raise account
                else:
                    accounts[account_id] = account
            if not accounts:
                return
            ledger = await engine.store.analytics_weeks(list(accounts))
            today = engine.clock().date()
            decided = []
            for account_id, account in accounts.items():
                drawdown = analytics.current_drawdown(ledger[account_id], today)
                limit = engine.rules.drawdown_limit_bps.get(account.type, 0) / 10_000
                breached = account.status not in ("closed", "merged") and analytics.breached(drawdown, limit)
                if breached != (account_id in self.flags):
                    decided.append((account_id, account, breached, drawdown, limit))
            # The accounts whose flag stays as it is are free now: only those whose flag
            # changes stay locked while their flags are written.
            changing = {account_id for account_id, *_ in decided}
            for account_id, lock in zip(ids, locks):
                if account_id not in changing and lock in acquired:
                    acquired.remove(lock)
                    lock.release()
            changed = False
            for account_id, account, breached, drawdown, limit in decided:
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                engine.writer.submit(FlagOp(account_id, account.portfolio_id, breached, drawdown, limit,
                                            engine.clock(), Reply(loop, future).done_on_loop))
                await future
                if breached:
                    self.flags[account_id] = drawdown
                else:
                    self.flags.pop(account_id, None)
                changed = True
            if changed:
                engine._signal_commit()
        except EngineError as error:
            log.warning("drawdown checks of %s failed: %s (each account's next loss or fee checks it again)",
                        ", ".join(ids), error.message)
        finally:
            for lock in acquired:
                lock.release()
