"""Predictive modelling: a portfolio simulated week by week with the very same rule
functions the live engine uses (`decide`, `mutate`, the fork check inside `decide`,
`merge_due`/`merge_steps`). Pure: the start date comes in; ids are a counter.

Week semantics (SPEC section 3): each simulated week, every account active at the
week's start earns `balance * (1 - cash_buffer) * weekly_rate` as premium (rounded to
the cent; a negative rate books a loss, at most the balance), in creation order, taking
its balance at its turn; the growth rules apply after each credit exactly as live:
the fork check on a Gen-Acc, then the merge check of the account's unit. Accounts
created during a week earn from the next week."""
from __future__ import annotations

import itertools
from datetime import date, datetime, time, timedelta, timezone

from msgspec import Struct

from engine.growth import merge_date, merge_due, merge_in, merge_steps, open_portfolio, weekly_premium
from engine.model import Account, BookTrade, Event, Portfolio, PortfolioMerged, PortfolioOpened
from engine.rules import DEFAULT_RULES, Rules, decide, mutate


class Period(Struct, frozen=True, kw_only=True):
    """One week or one year of a projection. `income` is the net trade result of the
    period; `forks` and `merges` happened in it; the rest is the state at its end."""

    total_value: int
    income: int
    forks: int
    merges: int
    active_units: int
    generation: int
    revenue: int
    compounding: int


class Week(Period, frozen=True, kw_only=True):
    week: int


class Year(Period, frozen=True, kw_only=True):
    year: int


class Projection(Struct, frozen=True, kw_only=True):
    initial_capital: int
    weeks: list[Week]
    years: list[Year]
    units_created: int
    units_merged: int
    final_total_value: int


class Book:
    """The simulated ledger: accounts and portfolios in creation order."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.portfolios: dict[str, Portfolio] = {}
        self.forks = 0
        self.merges = 0

    def apply(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, PortfolioOpened):
                self.portfolios[event.portfolio.id] = event.portfolio
                for account in event.accounts:
                    self.accounts[account.id] = account
                if event.portfolio.is_unit:
                    self.forks += 1
            elif isinstance(event, PortfolioMerged):
                self.portfolios[event.portfolio_id] = _merged(self.portfolios[event.portfolio_id], event)
                self.merges += 1
            else:
                self.accounts[event.account_id] = mutate(self.accounts[event.account_id], event)

    def merge_if_due(self, portfolio: Portfolio, now: datetime, new_id, rules: Rules) -> None:
        balances = [self.accounts[i].balance for i in portfolio.account_ids]
        if not merge_due(portfolio, balances, rules):
            return
        root = self.portfolios[portfolio.root_id]
        correlation_id = new_id("mrg")
        when = merge_date([self.accounts[i] for i in (*portfolio.account_ids, root.compounding_account_id)])
        events: list[Event] = []
        for account_id, command in merge_steps(portfolio, root.compounding_account_id, when):
            command = command or merge_in(portfolio, events, when)
            events += decide(self.accounts[account_id], command, transaction_id=new_id("txn"), now=now,
                             correlation_id=correlation_id, rules=rules, new_id=new_id)
        self.apply(events)

    def total(self, account_type: str | None = None) -> int:
        return sum(a.balance for a in self.accounts.values() if account_type is None or a.type == account_type)

    def active_units(self) -> int:
        return self.forks - self.merges


def _merged(portfolio: Portfolio, event: PortfolioMerged) -> Portfolio:
    from msgspec.structs import replace
    return replace(portfolio, status="merged", merged_at=event.at)


def project(*, initial_capital: int, weeks: int, weekly_return_bps: dict[str, int], start: date,
            rules: Rules = DEFAULT_RULES, name: str = "projection", owner: str = "projection") -> Projection:
    counter = itertools.count(1)

    def new_id(prefix: str) -> str:
        return f"{prefix}_{next(counter):012d}"

    book = Book()
    book.apply(open_portfolio(name=name, owner=owner, capital=initial_capital, now=_at(start), new_id=new_id,
                              rules=rules))
    series: list[Week] = []
    for week in range(1, weeks + 1):
        now = _at(start + timedelta(days=7 * week))
        forks, merges, income = book.forks, book.merges, 0
        for account_id in [a.id for a in book.accounts.values() if a.status == "active"]:
            income += _earn(book, account_id, now, new_id, weekly_return_bps, rules)
        series.append(Week(week=week, income=income, forks=book.forks - forks, merges=book.merges - merges,
                           **_state(book)))
    return Projection(initial_capital=initial_capital, weeks=series, years=yearly(series),
                      units_created=book.forks, units_merged=book.merges, final_total_value=book.total())


def _earn(book: Book, account_id: str, now: datetime, new_id, weekly_return_bps, rules: Rules) -> int:
    account = book.accounts[account_id]
    if account.status != "active":
        return 0
    premium = weekly_premium(account.balance, rules.cash_buffer_bps.get(account.type, 0),
                             weekly_return_bps.get(account.type, 0))
    premium = max(premium, -account.balance)
    if premium == 0:
        return 0
    command = BookTrade(kind="premium" if premium > 0 else "loss", amount=abs(premium))
    book.apply(decide(account, command, transaction_id=new_id("txn"), now=now, rules=rules, new_id=new_id))
    portfolio = book.portfolios[account.portfolio_id]
    if premium > 0 and portfolio.is_unit:
        book.merge_if_due(portfolio, now, new_id, rules)
    return premium


def _state(book: Book) -> dict:
    by_type = {"generation": 0, "revenue": 0, "compounding": 0}
    for account in book.accounts.values():
        by_type[account.type] += account.balance
    return dict(total_value=sum(by_type.values()), active_units=book.active_units(), **by_type)


def yearly(series: list[Week]) -> list[Year]:
    """52-week years; a last partial year is reported as its own row."""
    years = []
    for index in range(0, len(series), 52):
        chunk = series[index:index + 52]
        last = chunk[-1]
        years.append(Year(year=index // 52 + 1, total_value=last.total_value, income=sum(w.income for w in chunk),
                          forks=sum(w.forks for w in chunk), merges=sum(w.merges for w in chunk),
                          active_units=last.active_units, generation=last.generation, revenue=last.revenue,
                          compounding=last.compounding))
    return years


def _at(day: date) -> datetime:
    return datetime.combine(day, time(12, 0), tzinfo=timezone.utc)
