"""Reads: accounts (an account's committed state from its resident actor, so reads keep
working while the database is down), transactions, the event feed, and the analytics of
accounts and portfolios (pure functions of `engine/analytics.py` over ledger reads, on a
worker thread)."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from actors.account import Read, Reply
from actors.inputs import Page, check_id, check_limit, clean_text
from engine import analytics, limits
from engine.errors import NotFound, Unavailable, ValidationFailed
from engine.model import Account, Transaction

# Every account id starts so (`actors.ids.new_id("acc")`), the cursor of a list of them too.
ACCOUNT_ID_PREFIX = "acc_"


class Queries:
    def __init__(self, engine) -> None:
        self._engine = engine
        self.admission = engine.admission

    # -- accounts and transactions ---------------------------------------------------
    async def get_account(self, account_id: str) -> Account:
        """The committed state, from the resident actor (reads keep working while the
        database is down) or activated from the database."""
        check_id(account_id)
        self.admission.admit()
        engine = self._engine
        registry = engine.registry
        entry = await registry.acquire(account_id)
        try:
            future = engine._loop.create_future()
            if not registry.tell(account_id, Read(Reply(engine._loop, future))):
                raise Unavailable("the account actor stopped; retry", code="account_restarting")
            return await self.admission.bounded(future)
        finally:
            registry.release(entry)

    async def list_accounts(self, *, limit: int = limits.PAGE_SIZE_DEFAULT, cursor: str | None = None,
                            type: str | None = None, status: str | None = None, owner: str | None = None,
                            portfolio_id: str | None = None) -> Page:
        check_limit(limit)
        if type is not None and type not in ("generation", "revenue", "compounding"):
            raise ValidationFailed("unknown account type", {"field": "type"})
        if status is not None and status not in ("active", "frozen", "closed", "merged"):
            raise ValidationFailed("unknown account status", {"field": "status"})
        for name, value, length_max in (("cursor", cursor, limits.ID_LENGTH_MAX),
                                        ("owner", owner, limits.OWNER_LENGTH_MAX),
                                        ("portfolio_id", portfolio_id, limits.ID_LENGTH_MAX)):
            if value is not None and not clean_text(value, length_max):
                raise ValidationFailed(f"malformed {name}", {"field": name})
        if cursor is not None and not cursor.startswith(ACCOUNT_ID_PREFIX):
            # The cursor is the id the previous page ended with: anything else is a
            # mistake (it used to answer an empty page, as if the list had ended).
            raise ValidationFailed("malformed cursor: pass the previous page's next_cursor", {"field": "cursor"})
        items = await self._engine.store.list_accounts(limit=limit + 1, after_id=cursor, type=type, status=status,
                                                       owner=owner, portfolio_id=portfolio_id)
        next_cursor = items[limit - 1].id if len(items) > limit else None
        return Page(items=items[:limit], next_cursor=next_cursor)

    async def get_transaction(self, transaction_id: str) -> Transaction:
        check_id(transaction_id)
        transaction = await self._engine.store.get_transaction(transaction_id)
        if transaction is None:
            raise NotFound("no such transaction", {"transaction_id": transaction_id})
        return transaction

    async def list_transactions(self, account_id: str, *, limit: int = limits.PAGE_SIZE_DEFAULT,
                                cursor: str | None = None) -> Page:
        """Newest first. The cursor is the `sequence` of the last item seen."""
        check_id(account_id)
        check_limit(limit)
        before = None
        if cursor is not None:
            if not (isinstance(cursor, str) and cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
                raise ValidationFailed("malformed cursor", {"field": "cursor"})
            before = int(cursor)
        store = self._engine.store
        if self._engine.registry.peek(account_id) is None and await store.load_account(account_id) is None:
            raise NotFound("no such account", {"account_id": account_id})
        items = await store.list_transactions(account_id, limit=limit + 1, before_sequence=before)
        next_cursor = str(items[limit - 1].sequence) if len(items) > limit else None
        return Page(items=items[:limit], next_cursor=next_cursor)

    # -- events ----------------------------------------------------------------------
    async def events_page(self, *, after: int = 0, limit: int = limits.PAGE_SIZE_DEFAULT,
                          owner: str | None = None) -> list:
        """Committed events after `after`, in commit order; with `owner`, only the events
        of that owner's accounts and portfolios."""
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ValidationFailed("after must be a non-negative integer", {"field": "after"})
        check_limit(limit)
        return await self._engine.store.events_after(after, limit, owner)

    async def events(self, *, after: int | None = None):
        """Every committed event after `after` (default: from now on), in commit order,
        forever: an async iterator. Resume after a restart by passing the last `seq`."""
        engine = self._engine
        if after is None:
            rows = await engine.store.fetch("SELECT coalesce(max(seq), 0) AS seq FROM events")
            after = rows[0]["seq"]
        while True:
            signal = engine._commit_signal
            page = await engine.store.events_after(after, 500)
            for event in page:
                after = event.seq
                yield event
            if not page:
                try:
                    await asyncio.wait_for(signal.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass

    def subscribe(self, callback: Callable[[Any], Any], *, after: int | None = None) -> asyncio.Task:
        """Calls `callback(event)` (a function or a coroutine function) for every event
        committed after `after`; cancel the returned task to stop."""
        async def deliver():
            async for event in self.events(after=after):
                outcome = callback(event)
                if asyncio.iscoroutine(outcome):
                    await outcome

        return self._engine._in_background(deliver())

    # -- analytics -------------------------------------------------------------------
    @staticmethod
    def _check_weeks(weeks: Any) -> None:
        if weeks is not None and (not isinstance(weeks, int) or isinstance(weeks, bool)
                                  or not 1 <= weeks <= limits.ANALYTICS_WEEKS_MAX):
            raise ValidationFailed(f"weeks must be 1 to {limits.ANALYTICS_WEEKS_MAX}", {"field": "weeks"})

    async def account_analytics(self, account_id: str, *, weeks: int | None = None) -> analytics.AccountAnalytics:
        """Performance, risk, trend and forecast of one account from its ledger (see
        docs/analytics.md for every formula); `weeks` limits the window."""
        self._check_weeks(weeks)
        engine = self._engine
        store, settings, rules = engine.store, engine.settings, engine.rules
        account = await self.get_account(account_id)
        portfolio, states = None, {account_id: account}
        if account.portfolio_id is not None:
            portfolio = await engine.portfolios.portfolio_record(account.portfolio_id)
            states = {**await store.load_accounts(list(portfolio.account_ids)), account_id: account}
        unit = portfolio if portfolio is not None and portfolio.is_unit and portfolio.status == "active" else None
        # A unit's forecast needs its other accounts' histories (the merge is the unit's).
        ids = [account_id] + ([i for i in portfolio.account_ids if i != account_id] if unit else [])
        ledger = await store.analytics_weeks(ids)
        siblings = [(states[i], ledger[i]) for i in ids[1:] if i in states] if unit else None
        portfolio_balance = sum(s.balance for s in states.values()) if portfolio is not None else None
        today = engine.clock().date()
        result = await asyncio.to_thread(
            analytics.account_analytics, account, ledger[account_id], today=today, weeks=weeks, rules=rules,
            risk_free_rate=settings.analytics.risk_free_rate,
            required_return=settings.analytics.required_return, portfolio_balance=portfolio_balance, unit=unit,
            siblings=siblings)
        flagged = "drawdown_breach" in result.risk.flags if weeks is None else None
        if flagged is not None and flagged != (account_id in engine.risk.flags):
            # The live flag disagrees (history imported, or a check still queued): settle it.
            await engine.risk.check(account_id)
        return result

    async def portfolio_analytics(self, portfolio_id: str, *, weeks: int | None = None) -> analytics.PortfolioAnalytics:
        """The same over a portfolio and every unit below it, with the fork tree's growth."""
        self._check_weeks(weeks)
        engine = self._engine
        store, settings, rules = engine.store, engine.settings, engine.rules
        root = await engine.portfolios.portfolio_record(portfolio_id)
        portfolios = await store.portfolio_tree(portfolio_id, depth_max=rules.portfolio_depth_max + 1,
                                                nodes_max=settings.engine.tree_nodes_max)
        ids = [i for p in portfolios for i in p.account_ids]
        # Three independent reads over the pool: at once, not one after another.
        accounts, ledger, moved = await asyncio.gather(
            store.load_accounts(ids), store.analytics_weeks(ids), store.growth_moved(ids))
        return await asyncio.to_thread(
            analytics.portfolio_analytics, root, portfolios, accounts, ledger, today=engine.clock().date(),
            weeks=weeks, rules=rules, risk_free_rate=settings.analytics.risk_free_rate,
            required_return=settings.analytics.required_return, moved=moved)

    def drawdown_breaches(self) -> dict[str, float]:
        """Accounts whose drawdown_breach flag is set, with the drawdown that set it."""
        return self._engine.risk.breaches()
