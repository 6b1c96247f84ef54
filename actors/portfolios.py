"""Portfolios and their growth: open a root portfolio, read it and its fork tree, fork a
Gen-Acc's surplus into a new unit, merge a unit back (on demand, or when a credit takes
it past the merge threshold), reinvest a quarter (on demand, and on schedule for every
root portfolio), and project a new portfolio forward.

What each of these decides is in pure functions of `engine/growth.py` (plans and
commands); this part runs them through the dispatcher (`actors/dispatch.py`) and keeps a
bounded cache of portfolio rows, which change only when this engine merges a unit (the
only writer)."""
from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from datetime import date

import msgspec

from actors.account import Decided
from actors.context import AUDIT_CONTEXT, OPERATION
from actors.dispatch import NO_SKIP
from actors.ids import new_id
from actors.inputs import check_id, validate
from engine import growth, ledger, projection, reports
from engine.audit import SCHEDULER, AuditContext
from engine.errors import EngineError, NotFound, Refused, ValidationFailed
from engine.model import Fork, GrowthOperation, Portfolio, Reinvest
from engine.requests import CreatePortfolioRequest, ForkRequest, ProjectionRequest, ReinvestRequest
from engine.rules import previous_quarter

log = logging.getLogger("alluse.engine")

PORTFOLIO_CACHE_MAX = 100_000
REINVEST_SKIPS = frozenset({"already_reinvested", "account_not_active", "quarter_before_opening"})


class Portfolios:
    def __init__(self, engine) -> None:
        self._engine = engine
        self.dispatch = engine.dispatch
        self.rules = engine.rules
        self.clock = engine.clock
        self.cache: collections.OrderedDict[str, Portfolio] = collections.OrderedDict()
        # One merge at a time per unit; a lock lives while someone holds or awaits it.
        self._merge_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._scheduled_quarter: str | None = None

    async def create_portfolio(self, *, name: str, owner: str, initial_capital: int, opened_on: date | None = None,
                               idempotency_key: str | None = None) -> reports.PortfolioView:
        """A root portfolio: its capital split 40/30/30 (remainder of rounding to the
        Com-Acc) into Gen-Acc, Rev-Acc and Com-Acc, all in one commit."""
        request = validate(CreatePortfolioRequest, name=name, owner=owner, initial_capital=initial_capital,
                           opened_on=opened_on)

        async def run(idempotency):
            events = growth.open_portfolio(name=request.name, owner=request.owner, capital=request.initial_capital,
                                           now=self.clock(), new_id=new_id, opened_on=request.opened_on,
                                           rules=self.rules)
            rows = ledger.Rows()
            ledger.apply_events(rows, events)
            view = reports.portfolio_view(events[0].portfolio, rows.states, [], {}, self.rules)
            ledger.describe_opening(rows, view)
            return await self.dispatch.write(rows, view, idempotency)

        return await self.dispatch.idempotent(idempotency_key, ("create_portfolio", None, request),
                                              reports.PortfolioView, run)

    # -- reads -----------------------------------------------------------------------
    async def portfolio_record(self, portfolio_id: str) -> Portfolio:
        """The portfolio's own row (its owner, parent, accounts), from a bounded cache."""
        check_id(portfolio_id)
        cache = self.cache
        portfolio = cache.get(portfolio_id)
        if portfolio is not None:
            cache.move_to_end(portfolio_id)
            return portfolio
        portfolio = await self._engine.store.load_portfolio(portfolio_id)
        if portfolio is None:
            raise NotFound("no such portfolio", {"portfolio_id": portfolio_id})
        cache[portfolio_id] = portfolio
        while len(cache) > PORTFOLIO_CACHE_MAX:
            cache.popitem(last=False)
        return portfolio

    async def get_portfolio(self, portfolio_id: str) -> reports.PortfolioView:
        """The portfolio's accounts, its direct units and totals (committed state)."""
        portfolio = await self.portfolio_record(portfolio_id)
        store = self._engine.store
        tree = await store.portfolio_tree(portfolio_id, depth_max=1,
                                          nodes_max=self._engine.settings.engine.tree_nodes_max)
        units = tree[1:]
        ids = list(portfolio.account_ids) + [i for unit in units for i in unit.account_ids]
        accounts = await store.load_accounts(ids)
        return reports.portfolio_view(portfolio, accounts, units, accounts, self.rules)

    async def portfolio_tree(self, portfolio_id: str) -> reports.PortfolioTree:
        """The whole fork tree below a portfolio (breadth first, bounded)."""
        await self.portfolio_record(portfolio_id)
        store = self._engine.store
        nodes_max = self._engine.settings.engine.tree_nodes_max
        portfolios = await store.portfolio_tree(portfolio_id, depth_max=self.rules.portfolio_depth_max + 1,
                                                nodes_max=nodes_max + 1)
        truncated = len(portfolios) > nodes_max
        portfolios = portfolios[:nodes_max]
        accounts = await store.load_accounts([i for p in portfolios for i in p.account_ids])
        return reports.portfolio_tree(portfolio_id, portfolios, accounts, truncated, self.rules)

    # -- fork and merge --------------------------------------------------------------
    async def fork(self, account_id: str, *, amount: int | None = None,
                   idempotency_key: str | None = None) -> GrowthOperation:
        """A manual fork of a portfolio's Gen-Acc: `amount` (default: the whole surplus
        over its baseline) leaves for a new unit, half to its Gen-Acc, the rest to its
        Com-Acc, in one commit."""
        request = validate(ForkRequest, amount=amount)
        check_id(account_id)
        return await self.dispatch.idempotent(
            idempotency_key, ("fork", account_id, request), GrowthOperation,
            lambda idempotency: self.dispatch.on_account(account_id, Fork(amount=request.amount), _render_fork,
                                                         idempotency))

    async def merge_portfolio(self, portfolio_id: str, *, idempotency_key: str | None = None) -> GrowthOperation:
        """Merges a forked unit now: all its money to the root's Com-Acc in one commit;
        its accounts become `merged`. Units below it stay where they are."""
        check_id(portfolio_id)
        return await self.dispatch.idempotent(
            idempotency_key, ("merge", portfolio_id, ForkRequest()), GrowthOperation,
            lambda idempotency: self._merge(portfolio_id, idempotency, force=True))

    def merge_due(self, account_id: str) -> str | None:
        """The forked unit a credit to `account_id` may have to merge (None: no merge
        check is needed, the common case, decided without a coroutine). The account's
        last committed state says: a unit's accounts never leave their unit."""
        entry = self._engine.registry.resident.get(account_id)
        if entry is None or entry.actor.committed.portfolio_depth == 0:
            return None
        return entry.actor.committed.portfolio_id

    async def after_credit(self, portfolio_id: str) -> GrowthOperation | None:
        """The merge check that follows every credit to an account of a forked unit
        (`merge_due`); it completes before the credit is answered, so a caller sees the
        merge it caused (returned, for the credit's reply)."""
        reset = OPERATION.set(("merge.automatic", portfolio_id))
        try:
            return await self._merge(portfolio_id, None, force=False)
        except EngineError as error:
            log.warning("merge check of %s after a credit failed: %s", portfolio_id, error.message)
            return None
        finally:
            OPERATION.reset(reset)

    async def _merge(self, portfolio_id: str, idempotency, *, force: bool) -> GrowthOperation | None:
        lock = self._merge_locks.get(portfolio_id)
        if lock is None:
            lock = self._merge_locks[portfolio_id] = asyncio.Lock()
        get_account = self._engine.queries.get_account
        async with lock:
            unit = await self.portfolio_record(portfolio_id)
            if not unit.is_unit or unit.status != "active":
                if force:
                    raise Refused("only an active forked unit can merge",
                                  {"portfolio_id": portfolio_id, "status": unit.status}, code="merge_not_allowed")
                return None
            if not force:
                balances = [(await get_account(i)).balance for i in unit.account_ids]
                if not growth.merge_due(unit, balances, self.rules):
                    return None
            root = await self.portfolio_record(unit.root_id)
            try:
                result = await self._run_merge(unit, root, idempotency)
            finally:
                # Merged (or perhaps merged: a failed commit may have landed): re-read it.
                self.cache.pop(unit.id, None)
        self._engine.risk.after_merge(unit.account_ids)
        return result

    async def _run_merge(self, unit: Portfolio, root: Portfolio, idempotency) -> GrowthOperation:
        merge_id = new_id("mrg")
        now = self.clock()
        touched = [*unit.account_ids, root.compounding_account_id]
        get_account = self._engine.queries.get_account
        when = growth.merge_date([await get_account(i) for i in touched])
        steps = []
        for account_id, command in growth.merge_steps(unit, root.compounding_account_id, when):
            steps.append((account_id, command or (lambda events: growth.merge_in(unit, events, when)), NO_SKIP))

        def render(decided: Decided) -> GrowthOperation:
            legs = decided.transactions
            amount = sum(leg.amount for leg in legs if leg.direction == "credit")
            return GrowthOperation(id=merge_id, kind="merge", portfolio_id=unit.id, amount=amount, created_at=now,
                                   legs=legs)

        return await self.dispatch.run_steps(steps, render, idempotency, correlation_id=merge_id)

    # -- reinvestment ----------------------------------------------------------------
    async def reinvest_portfolio(self, portfolio_id: str, quarter: str, *,
                                 idempotency_key: str | None = None) -> reports.Reinvestment:
        """Quarterly reinvestment of every Rev-Acc and Com-Acc in the portfolio and the
        units below it, in one commit. Accounts already reinvested for the quarter (or
        opened after it, or closed) are skipped; if all are, 409 already_reinvested."""
        request = validate(ReinvestRequest, quarter=quarter)
        check_id(portfolio_id)

        async def run(idempotency):
            tree = await self.portfolio_tree(portfolio_id)
            steps = [(account.id, Reinvest(quarter=request.quarter), REINVEST_SKIPS)
                     for node in tree.nodes for account in node.accounts
                     if account.type in self.rules.reinvested_types and account.status not in ("closed", "merged")]
            if not steps:
                raise Refused("no account of this portfolio reinvests", {"portfolio_id": portfolio_id},
                              code="already_reinvested")

            def render(decided: Decided) -> reports.Reinvestment:
                return reports.reinvestment_report(portfolio_id, request.quarter, decided.events, decided.skipped)

            return await self.dispatch.run_steps(steps, render, idempotency, correlation_id=new_id("rnv"))

        return await self.dispatch.idempotent(idempotency_key, ("reinvest", portfolio_id, request),
                                              reports.Reinvestment, run)

    def schedule_reinvestment(self, today: date) -> None:
        """The quarterly schedule (the engine's maintenance calls this every tick): once
        a quarter has ended, reinvest it for every root portfolio, in the background."""
        quarter = previous_quarter(today)
        if quarter != self._scheduled_quarter:
            self._scheduled_quarter = quarter
            self._engine._in_background(self._reinvest_everything(quarter))

    async def _reinvest_everything(self, quarter: str) -> None:
        """Reinvests `quarter` for every root portfolio (idempotent: accounts already
        done are skipped)."""
        AUDIT_CONTEXT.set(AuditContext(SCHEDULER, request_id=f"schedule-{quarter}"))
        after, done = "", 0
        while True:
            try:
                rows = await self._engine.store.fetch("SELECT id FROM portfolios WHERE parent_id IS NULL AND id > $1 "
                                                      "ORDER BY id LIMIT 200", after)
            except EngineError as error:
                # The database is away: try the whole quarter again at the next tick
                # (idempotent: portfolios already done are skipped).
                log.warning("scheduled reinvestment of %s postponed: %s", quarter, error.message)
                self._scheduled_quarter = None
                return
            if not rows:
                break
            for row in rows:
                after = row["id"]
                try:
                    await self.reinvest_portfolio(after, quarter)
                    done += 1
                except EngineError:
                    continue
        if done:
            log.info("scheduled reinvestment of %s: %d portfolios", quarter, done)

    # -- projection ------------------------------------------------------------------
    async def project(self, *, initial_capital: int, weeks: int, weekly_return_bps: dict, start_date: date | None = None,
                      include_weeks: bool = True, **overrides) -> projection.Projection:
        """Simulates a new portfolio week by week with the live rule functions (on a
        worker thread: ten years take a fraction of a second)."""
        request = validate(ProjectionRequest, initial_capital=initial_capital, weeks=weeks,
                           weekly_return_bps=weekly_return_bps, start_date=start_date, include_weeks=include_weeks,
                           **overrides)
        return await asyncio.to_thread(run_projection, request, self.rules, self.clock().date())


def _render_fork(decided: Decided):
    legs = decided.transactions
    debit = legs[0]
    unit = decided.states[debit.counterparty_account_id].portfolio_id
    return GrowthOperation(id=debit.correlation_id, kind="fork", portfolio_id=unit, amount=debit.amount,
                           created_at=debit.created_at, legs=legs)


def run_projection(request: ProjectionRequest, rules, today: date) -> projection.Projection:
    overrides = {name: getattr(request, name) for name in ("fork_threshold_cents", "merge_threshold_cents")
                 if getattr(request, name) is not None}
    for name in ("cash_buffer_bps", "capital_share_bps"):
        value = getattr(request, name)
        if value is not None:
            overrides[name] = {**getattr(rules, name), **value}
    if overrides:
        try:
            rules = msgspec.structs.replace(rules, **overrides)
            rules.__post_init__()
        except ValueError as error:
            field = next((name for name in overrides if str(error).startswith(name)), "")
            raise ValidationFailed(str(error), {"field": field, "reason": str(error)}) from None
    returns = msgspec.structs.asdict(request.weekly_return_bps)
    try:
        result = projection.project(initial_capital=request.initial_capital, weeks=request.weeks,
                                    weekly_return_bps=returns, start=request.start_date or today, rules=rules)
    except Refused as refusal:
        # The simulated accounts hit a rule limit (a balance past 10^17 cents): the inputs
        # describe an impossible portfolio.
        raise ValidationFailed(f"the projection breaks a rule: {refusal.message}",
                               {"field": "weeks", "reason": refusal.code}) from None
    return result if request.include_weeks else msgspec.structs.replace(result, weeks=[])
