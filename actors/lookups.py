"""Reads the API hands out ids for but the operation path does not serve (issue 12):
root portfolios with their totals, and a transfer, fork or merge by the id its reply
carried (its correlation id, shared by its legs). Pure reads of committed state over
the engine's store; they take the running `Engine` and touch no actor."""
from __future__ import annotations

from datetime import date, datetime
from typing import Any

import msgspec

from engine import limits
from engine.errors import NotFound, ValidationFailed
from engine.model import GrowthOperation, Portfolio, Transaction, Transfer
from engine.reports import Totals


class PortfolioSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A root portfolio in a list: its totals cover the whole fork tree below it."""

    id: str
    name: str
    owner: str
    status: str
    opened_on: date
    created_at: datetime
    units_active: int
    totals: Totals


class PortfolioPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[PortfolioSummary]
    next_cursor: str | None = None


def _summary(portfolio: Portfolio, sums: dict[str, int]) -> PortfolioSummary:
    balance = sums["generation"] + sums["revenue"] + sums["compounding"]
    return PortfolioSummary(id=portfolio.id, name=portfolio.name, owner=portfolio.owner, status=portfolio.status,
                            opened_on=portfolio.opened_on, created_at=portfolio.created_at,
                            units_active=sums["units_active"],
                            totals=Totals(balance=balance, deployable=sums["deployable"],
                                          generation=sums["generation"], revenue=sums["revenue"],
                                          compounding=sums["compounding"]))


def _clean(value: Any, length_max: int) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= length_max and "\x00" not in value


async def list_portfolios(engine, *, limit: int = limits.PAGE_SIZE_DEFAULT, cursor: str | None = None,
                          owner: str | None = None) -> PortfolioPage:
    """Root portfolios in id order (creation order), optionally one owner's."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= limits.PAGE_SIZE_MAX:
        raise ValidationFailed(f"limit must be 1 to {limits.PAGE_SIZE_MAX}", {"field": "limit"})
    for name, value, length_max in (("cursor", cursor, limits.ID_LENGTH_MAX), ("owner", owner, limits.OWNER_LENGTH_MAX)):
        if value is not None and not _clean(value, length_max):
            raise ValidationFailed(f"malformed {name}", {"field": name})
    rows = await engine.store.root_portfolios(limit=limit + 1, after_id=cursor, owner=owner,
                                              cash_buffer_bps=engine.rules.cash_buffer_bps)
    items = [_summary(portfolio, sums) for portfolio, sums in rows[:limit]]
    return PortfolioPage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


async def _legs(engine, operation_id: str, kinds: tuple[str, ...], what: str) -> list[Transaction]:
    if not _clean(operation_id, limits.ID_LENGTH_MAX):
        raise NotFound(f"no such {what}", {"id": str(operation_id)[:limits.ID_LENGTH_MAX].replace("\x00", "")})
    legs = await engine.store.entries_by_correlation(operation_id)
    if not legs or any(leg.kind not in kinds for leg in legs):
        raise NotFound(f"no such {what}", {"id": operation_id})
    return legs


async def get_transfer(engine, transfer_id: str) -> Transfer:
    legs = await _legs(engine, transfer_id, ("transfer",), "transfer")
    debit = next(leg for leg in legs if leg.direction == "debit")
    credit = next(leg for leg in legs if leg.direction == "credit")
    return Transfer(id=transfer_id, kind="transfer", from_account=debit.account_id, to_account=credit.account_id,
                    amount=debit.amount, memo=debit.memo, created_at=debit.created_at,
                    legs=sorted(legs, key=lambda leg: leg.direction != "debit"))


async def get_growth(engine, operation_id: str, kind: str) -> GrowthOperation:
    """A fork (`portfolio_id` = the unit it created) or a merge (= the unit it emptied)."""
    legs = await _legs(engine, operation_id, (kind,), kind)
    # A fork credits the new unit's accounts; a merge debits the unit's accounts.
    side = "credit" if kind == "fork" else "debit"
    accounts = await engine.store.load_accounts([leg.account_id for leg in legs if leg.direction == side])
    portfolio_id = next((a.portfolio_id for a in accounts.values() if a.portfolio_id), None)
    if portfolio_id is None:
        raise NotFound(f"no such {kind}", {"id": operation_id})
    amount = sum(leg.amount for leg in legs if leg.direction == "debit")
    ordered = sorted(legs, key=lambda leg: (leg.direction != "debit", leg.created_at))
    return GrowthOperation(id=operation_id, kind=kind, portfolio_id=portfolio_id, amount=amount,
                           created_at=ordered[0].created_at, legs=ordered)


async def owners_of(engine, legs: list[Transaction]) -> set[str]:
    accounts = await engine.store.load_accounts(sorted({leg.account_id for leg in legs}))
    return {account.owner for account in accounts.values()}
