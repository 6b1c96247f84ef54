"""Portfolio-level rules, pure: opening a root portfolio, when a unit merges, and the
steps of a merge. The live engine and the projection both call these."""
from __future__ import annotations

from datetime import date, datetime
from typing import Callable

from engine.model import Account, Event, Leg, LegPosted, MergeIn, MergeOut, Portfolio, PortfolioOpened
from engine.rules import DEFAULT_RULES, Rules, checked_opened_on

ROOT_ACCOUNT_NAMES = {"generation": "Gen-Acc", "revenue": "Rev-Acc", "compounding": "Com-Acc"}


def capital_split(capital: int, rules: Rules = DEFAULT_RULES) -> dict[str, int]:
    """40% / 30% / the remainder (SPEC defaults), rounded down except the remainder."""
    shares = rules.capital_share_bps
    generation = capital * shares["generation"] // 10_000
    revenue = capital * shares["revenue"] // 10_000
    return {"generation": generation, "revenue": revenue, "compounding": capital - generation - revenue}


def open_portfolio(*, name: str, owner: str, capital: int, now: datetime, new_id: Callable[[str], str],
                   opened_on: date | None = None, rules: Rules = DEFAULT_RULES) -> list[Event]:
    """A root portfolio with its three accounts, funded by opening deposits dated
    `opened_on`. The Gen-Acc's baseline is its opening balance."""
    opened = checked_opened_on(opened_on, now.date())
    split = capital_split(capital, rules)
    portfolio_id = new_id("prt")
    ids = {account_type: new_id("acc") for account_type in ("generation", "revenue", "compounding")}
    portfolio = Portfolio(id=portfolio_id, name=name, owner=owner, root_id=portfolio_id,
                          generation_account_id=ids["generation"], revenue_account_id=ids["revenue"],
                          compounding_account_id=ids["compounding"], opened_on=opened, created_at=now)
    accounts = [Account(id=ids[t], name=ROOT_ACCOUNT_NAMES[t], type=t, owner=owner, portfolio_id=portfolio_id,
                        root_portfolio_id=portfolio_id, baseline=split[t] if t == "generation" else 0,
                        opened_on=opened, created_at=now, updated_at=now)
                for t in ("generation", "revenue", "compounding")]
    correlation_id = new_id("opn")
    events: list[Event] = [PortfolioOpened(portfolio=portfolio, accounts=accounts)]
    for account in accounts:
        if split[account.type] > 0:
            events.append(LegPosted(leg=Leg(
                id=new_id("txn"), account_id=account.id, kind="deposit", direction="credit",
                amount=split[account.type], memo="initial capital", correlation_id=correlation_id,
                effective_date=opened, created_at=now)))
    return events


def merge_due(unit: Portfolio, balances: list[int], rules: Rules = DEFAULT_RULES) -> bool:
    """A forked unit whose accounts together hold the merge threshold merges."""
    return unit.is_unit and unit.status == "active" and sum(balances) >= rules.merge_threshold_cents


def merge_date(accounts: list[Account]) -> date | None:
    """One effective date for every leg of a merge: the latest effective date of the
    accounts it touches (the unit's and the root's Com-Acc), so the money leaves and
    arrives in the same week."""
    dates = [a.latest_effective_date for a in accounts if a.latest_effective_date is not None]
    return max(dates, default=None)


def merge_steps(unit: Portfolio, root_compounding_id: str,
                effective_date: date | None = None) -> list[tuple[str, MergeOut | None]]:
    """The order in which a merge visits accounts: the unit's Gen-Acc, its Com-Acc (each
    gives up everything and becomes merged), then the root's Com-Acc (`None` here: its
    MergeIn carries the sum of what the others gave, known only at its turn)."""
    out = MergeOut(to_account=root_compounding_id, effective_date=effective_date)
    return [(unit.generation_account_id, out), (unit.compounding_account_id, out), (root_compounding_id, None)]


def merge_in(unit: Portfolio, events_so_far: list[Event], effective_date: date | None = None) -> MergeIn:
    """The root Com-Acc's part, from the legs the unit's accounts decided."""
    debits = [e.leg for e in events_so_far if isinstance(e, LegPosted) and e.leg.direction == "debit"]
    dates = [leg.effective_date for leg in debits] + ([effective_date] if effective_date else [])
    return MergeIn(portfolio_id=unit.id, amount=sum(leg.amount for leg in debits),
                   effective_date=max(dates) if dates else None)


def weekly_premium(balance: int, cash_buffer_bps: int, weekly_return_bps: int) -> int:
    """balance * (1 - cash buffer) * weekly rate, rounded to the cent (half away from
    zero). Negative rates give a negative result: a loss."""
    exact = balance * (10_000 - cash_buffer_bps) * weekly_return_bps
    whole, rest = divmod(abs(exact), 10**8)
    cents = whole + (1 if 2 * rest >= 10**8 else 0)
    return cents if exact >= 0 else -cents
