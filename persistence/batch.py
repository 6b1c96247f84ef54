"""One batch of the writer, as rows: `apply_op` re-applies an operation's events to the
committed states with the core's `mutate` (refusing, and changing nothing, if they no
longer hold) and collects the rows to write, outbox events included; `write_batch`
writes them all in one statement."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from engine.model import (
    Account, Event, LegPosted, Portfolio, PortfolioMerged, PortfolioOpened, Reinvested, Renamed, StatusChanged,
    Transaction,
)
from engine.rules import mutate, transition
from persistence import store as sql

encode_json = msgspec.json.Encoder().encode


class OutboxRow(msgspec.Struct):
    """One event of the transactional outbox; `payload` (a Struct or a dict) is encoded
    with the rest of the batch."""

    type: str
    account_id: str | None
    portfolio_id: str | None
    correlation_id: str | None
    payload: Any
    created_at: datetime


class AccountUpdate(msgspec.Struct):
    """The columns a batch changes on an existing account, with the version it read."""

    id: str
    name: str
    status: str
    balance: int
    version: int
    previous_version: int
    latest_effective_date: object
    updated_at: datetime
    allocation_contracts: int
    allocation_leaps: int
    trade_income_cents: int
    last_reinvested_quarter: str | None


class KeyRow(msgspec.Struct):
    key: str
    fingerprint: str
    response: str      # the stored result's JSON text (stored as its UTF-8 bytes)


@dataclass(slots=True)
class BatchRows:
    portfolios: list[Portfolio] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    merged: list[tuple[str, datetime]] = field(default_factory=list)
    reinvestments: list[Reinvested] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    keys: list[KeyRow] = field(default_factory=list)
    tokens: list = field(default_factory=list)
    revocations: list[tuple[str, datetime]] = field(default_factory=list)
    audit: list = field(default_factory=list)

    def mark(self) -> tuple[int, ...]:
        return (len(self.portfolios), len(self.created), len(self.transactions), len(self.merged),
                len(self.reinvestments), len(self.outbox), len(self.keys), len(self.tokens), len(self.revocations),
                len(self.audit))

    def rollback(self, mark: tuple[int, ...]) -> None:
        for name, length in zip(self.__slots__, mark):
            del getattr(self, name)[length:]


def _event(rows: BatchRows, kind: str, payload, at: datetime, *, account_id=None, portfolio_id=None,
           correlation_id=None) -> None:
    rows.outbox.append(OutboxRow(kind, account_id, portfolio_id, correlation_id, payload, at))


def apply_op(op, states: dict[str, Account], portfolios_merging: set[str], rows: BatchRows) -> list[Transaction]:
    """Applies `op` to `states` in place and appends its rows. The caller snapshots and
    restores on failure (`rows.mark()`/`rollback`, and its copy of the touched states)."""
    transactions: list[Transaction] = []
    rows.tokens.extend(op.tokens)
    rows.revocations.extend(op.revocations)
    for account in op.creates:
        _open_account(account, states, rows)
    for event in op.events:
        if type(event) is LegPosted:  # the common case first
            transactions.append(_apply_account_event(event, states, rows))
            continue
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


TOKEN_ROW = ("id", "name", "role", "owner", "secret_hash", "created_by", "created_at")


def write_batch_args(states: dict[str, Account], before_versions: dict[str, int], rows: BatchRows) -> tuple:
    """The parameters of `WRITE_BATCH`: one JSON document per table (encoded here by
    msgspec, decoded by PostgreSQL's jsonb_to_recordset), plus the expected counts of
    the guarded updates. Far cheaper on the event loop than one array per column."""
    changed = [AccountUpdate(s.id, s.name, s.status, s.balance, s.version, before_versions[account_id],
                             s.latest_effective_date, s.updated_at, s.allocations.contracts, s.allocations.leaps,
                             s.trade_income_cents, s.last_reinvested_quarter)
               for account_id, s in states.items()
               if account_id in before_versions and s.version != before_versions[account_id]]
    tokens = [{name: getattr(token, name) for name in TOKEN_ROW} for token in rows.tokens]
    return (_json(rows.portfolios), _json([states[account_id] for account_id in rows.created]),
            _json(rows.transactions), _json(changed),
            _json([{"id": portfolio_id, "merged_at": at} for portfolio_id, at in rows.merged]),
            _json(rows.reinvestments), _json(rows.outbox), _json(rows.keys), len(changed), len(rows.merged),
            _json(tokens), _json([{"id": token_id, "revoked_at": at} for token_id, at in rows.revocations]),
            _json(rows.audit), len(rows.revocations), len(rows.keys))


async def write_batch(conn, states: dict[str, Account], before_versions: dict[str, int], rows: BatchRows) -> None:
    await conn.fetchval(sql.WRITE_BATCH, *write_batch_args(states, before_versions, rows))


def _json(items) -> str:
    return encode_json(items).decode() if items else "[]"
