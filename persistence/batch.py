"""One batch of the writer, as rows: `apply_op` re-applies an operation's events to the
committed states with the core's `mutate` (refusing, and changing nothing, if they no
longer hold) and collects the rows to write, outbox events included; `write_batch`
writes them all in one statement."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from engine.model import (
    Account, Event, LegPosted, Portfolio, PortfolioMerged, PortfolioOpened, Reinvested, Renamed, StatusChanged,
    Transaction,
)
from engine.rules import mutate, transition
from persistence import store as sql

encode_json = msgspec.json.Encoder().encode


@dataclass(slots=True)
class BatchRows:
    portfolios: list[Portfolio] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    merged: list[tuple[str, datetime]] = field(default_factory=list)
    reinvestments: list[Reinvested] = field(default_factory=list)
    outbox: list[tuple] = field(default_factory=list)
    keys: list[tuple[str, str, bytes]] = field(default_factory=list)
    tokens: list = field(default_factory=list)
    revocations: list[tuple[str, datetime]] = field(default_factory=list)
    audit: list = field(default_factory=list)

    def mark(self) -> tuple[int, ...]:
        return tuple(len(getattr(self, name)) for name in self.__slots__)

    def rollback(self, mark: tuple[int, ...]) -> None:
        for name, length in zip(self.__slots__, mark):
            del getattr(self, name)[length:]


def _event(rows: BatchRows, kind: str, payload, at: datetime, *, account_id=None, portfolio_id=None,
           correlation_id=None) -> None:
    rows.outbox.append((kind, account_id, portfolio_id, correlation_id, encode_json(payload).decode(), at))


def apply_op(op, states: dict[str, Account], portfolios_merging: set[str], rows: BatchRows) -> list[Transaction]:
    """Applies `op` to `states` in place and appends its rows. The caller snapshots and
    restores on failure (`rows.mark()`/`rollback`, and its copy of the touched states)."""
    transactions: list[Transaction] = []
    rows.tokens.extend(op.tokens)
    rows.revocations.extend(op.revocations)
    for account in op.creates:
        _open_account(account, states, rows)
    for event in op.events:
        match event:
            case PortfolioOpened(portfolio=portfolio, accounts=accounts):
                rows.portfolios.append(portfolio)
                fork_legs = [e.leg for e in op.events if isinstance(e, LegPosted)
                             and e.leg.direction == "debit" and e.leg.kind == "fork"]
                kind = "portfolio.forked" if portfolio.is_unit else "portfolio.opened"
                _event(rows, kind, {"portfolio": portfolio, "amount": sum(leg.amount for leg in fork_legs),
                                    "from_account": fork_legs[0].account_id if fork_legs else None},
                       portfolio.created_at, portfolio_id=portfolio.id,
                       correlation_id=fork_legs[0].correlation_id if fork_legs else None)
                for account in accounts:
                    _open_account(account, states, rows)
            case PortfolioMerged(portfolio_id=portfolio_id, at=at):
                assert portfolio_id not in portfolios_merging, f"portfolio {portfolio_id} merged twice"
                portfolios_merging.add(portfolio_id)
                rows.merged.append((portfolio_id, at))
                legs = [e.leg for e in op.events if isinstance(e, LegPosted) and e.leg.direction == "credit"]
                _event(rows, "portfolio.merged", {"portfolio_id": portfolio_id,
                                                  "amount": sum(leg.amount for leg in legs),
                                                  "to_account": legs[0].account_id if legs else None},
                       at, portfolio_id=portfolio_id, correlation_id=legs[0].correlation_id if legs else None)
            case _:
                transaction = _apply_account_event(event, states, rows)
                if transaction is not None:
                    transactions.append(transaction)
    return transactions


def _open_account(account: Account, states: dict[str, Account], rows: BatchRows) -> None:
    assert account.id not in states, f"account {account.id} exists"
    states[account.id] = account
    rows.created.append(account.id)
    _event(rows, "account.opened", account, account.created_at, account_id=account.id,
           portfolio_id=account.portfolio_id)


def _apply_account_event(event: Event, states: dict[str, Account], rows: BatchRows) -> Transaction | None:
    current = states[event.account_id]
    if isinstance(event, StatusChanged):
        transition(current, event.status)
        assert event.status != "closed" or current.balance == 0, "closing a non-empty account"
    if isinstance(event, LegPosted):
        assert current.status == "active", f"{current.id} is {current.status}"
    after = mutate(current, event)
    states[event.account_id] = after
    match event:
        case LegPosted(leg=leg):
            transaction = Transaction(
                id=leg.id, kind=leg.kind, account_id=leg.account_id,
                counterparty_account_id=leg.counterparty_account_id, amount=leg.amount, direction=leg.direction,
                balance_after=after.balance, memo=leg.memo, effective_date=leg.effective_date,
                created_at=leg.created_at, correlation_id=leg.correlation_id, sequence=after.version)
            rows.transactions.append(transaction)
            _event(rows, "transaction.posted", transaction, leg.created_at, account_id=leg.account_id,
                   portfolio_id=after.portfolio_id, correlation_id=leg.correlation_id)
            return transaction
        case StatusChanged(status=status, at=at):
            _event(rows, "account.status_changed", {"account_id": after.id, "status": status}, at,
                   account_id=after.id, portfolio_id=after.portfolio_id)
        case Reinvested(at=at):
            rows.reinvestments.append(event)
            _event(rows, "account.reinvested", event, at, account_id=after.id, portfolio_id=after.portfolio_id)
        case Renamed():
            pass
    return None


ACCOUNT_ROW = ("id", "name", "type", "status", "owner", "portfolio_id", "balance", "baseline",
               lambda a: a.allocations.contracts, lambda a: a.allocations.leaps, "version", "opened_on",
               "latest_effective_date", "created_at", "updated_at", "root_portfolio_id", "portfolio_depth",
               "trade_income_cents", "last_reinvested_quarter")
PORTFOLIO_ROW = sql.PORTFOLIO_FIELDS
ENTRY_ROW = ("id", "account_id", "sequence", "kind", "direction", "amount", "balance_after",
             "counterparty_account_id", "memo", "correlation_id", "effective_date", "created_at")
REINVESTMENT_ROW = ("account_id", "quarter", "net_income", "contracts", "leaps", "at")
TOKEN_ROW = ("id", "name", "role", "owner", "secret_hash", "created_by", "created_at")
AUDIT_ROW = ("seq", "at", "token_id", "role", "owner_scope", "action", "target", "request_id", "client", "outcome",
             "details", "prev_hash", "hash")


async def write_batch(conn, states: dict[str, Account], before_versions: dict[str, int], rows: BatchRows) -> None:
    accounts = [states[account_id] for account_id in rows.created]
    changed = [s for account_id, s in states.items()
               if account_id in before_versions and s.version != before_versions[account_id]]
    update_row = ("id", "name", "status", "balance", "version", lambda a: before_versions[a.id],
                  "latest_effective_date", "updated_at", lambda a: a.allocations.contracts,
                  lambda a: a.allocations.leaps, "trade_income_cents", "last_reinvested_quarter")
    await conn.fetchval(
        sql.WRITE_BATCH, *_columns(rows.portfolios, PORTFOLIO_ROW), *_columns(accounts, ACCOUNT_ROW),
        *_columns(rows.transactions, ENTRY_ROW), *_columns(changed, update_row),
        [m[0] for m in rows.merged], [m[1] for m in rows.merged],
        *_columns(rows.reinvestments, REINVESTMENT_ROW),
        *[[record[i] for record in rows.outbox] for i in range(6)],
        *[[key[i] for key in rows.keys] for i in range(3)],
        len(changed), len(rows.merged),
        *_columns(rows.tokens, TOKEN_ROW), [r[0] for r in rows.revocations], [r[1] for r in rows.revocations],
        *_columns(rows.audit, AUDIT_ROW), len(rows.revocations))


def _columns(items, getters) -> list[list]:
    columns = []
    for getter in getters:
        if callable(getter):
            columns.append([getter(item) for item in items])
        else:
            columns.append([getattr(item, getter) for item in items])
    return columns
