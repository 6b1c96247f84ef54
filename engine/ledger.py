"""What one operation writes, decided once.

The account actors decide an operation with `engine.rules.decide`, then `apply_events`
turns the decided events into the operation's rows, in their committed shape: each
touched account's state after the operation (and the version it had before, for the
writer's guard), every ledger entry with its `balance_after` and `sequence`, the
portfolios opened or merged, the reinvestments, and the outbox events. The writer takes
these rows as they are: it never re-applies a rule. Pure: no I/O, no clock, no ids."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import msgspec

from engine.model import (
    Account, Event, LegPosted, Portfolio, PortfolioMerged, PortfolioOpened, Reinvested, Renamed, StatusChanged,
    Transaction, Transfer,
)
from engine.rules import mutate, transition

# Legs of these kinds belong to an operation on several accounts: its one event carries
# them, instead of one `transaction.posted` per leg.
MULTI_LEG_KINDS = frozenset({"transfer", "fork", "merge"})
# Every type of event the outbox holds: what this module writes, and the drawdown flags
# `persistence.store` writes. Webhook endpoints subscribe to these (`engine.webhooks`).
EVENT_TYPES = ("account.opened", "transaction.posted", "transfer.posted", "account.status_changed",
               "portfolio.opened", "portfolio.forked", "portfolio.merged", "account.reinvested",
               "account.drawdown_breach", "account.drawdown_recovered")


class OutboxRow(msgspec.Struct, gc=False):
    """One event of the transactional outbox; `payload` (a Struct or a dict) is encoded
    with the rest of the batch, unless it is `derived`: exactly the operation's own
    entries, which the readers rebuild it from (`persistence.store.derived_payloads`), so
    it is not stored twice. A derived `transaction.posted` names its entry by
    `entry_sequence` (its place in `account_id`'s ledger); a derived `transfer.posted` by
    its `correlation_id`."""

    type: str
    account_id: str | None
    portfolio_id: str | None
    correlation_id: str | None
    payload: Any
    created_at: datetime
    derived: bool = False
    entry_sequence: int | None = None


class Rows(msgspec.Struct):
    """Everything one operation writes. `states` holds the state after the operation of
    every account it touches (created ones included); `before` the version each existing
    one had before it (the writer's guard); `created` the ids of accounts it opens."""

    states: dict[str, Account] = msgspec.field(default_factory=dict)
    before: dict[str, int] = msgspec.field(default_factory=dict)
    created: list[str] = msgspec.field(default_factory=list)
    transactions: list[Transaction] = msgspec.field(default_factory=list)
    portfolios: list[Portfolio] = msgspec.field(default_factory=list)
    merged: list[tuple[str, datetime]] = msgspec.field(default_factory=list)
    reinvestments: list[Reinvested] = msgspec.field(default_factory=list)
    outbox: list[OutboxRow] = msgspec.field(default_factory=list)

    def touch(self, account: Account) -> None:
        """`account` (its tentative state) takes part in the operation."""
        if account.id not in self.states:
            self.states[account.id] = account
            self.before[account.id] = account.version


def apply_events(rows: Rows, events: list[Event]) -> list[Transaction]:
    """Applies decided `events` to `rows.states` (every account they name must have been
    `touch`ed, or be opened by them) and appends their rows; returns the new entries.
    Assertions guard our own invariants (a decision that does not fit its state is a bug)."""
    transactions: list[Transaction] = []
    # A fork's or a merge's one event carries its legs (a merge's come from every account
    # of the operation): it takes its place before them and its legs once they exist.
    growth: list[tuple[str, list]] = []
    for event in events:
        kind = type(event)
        if kind is LegPosted:  # the common case first
            transactions.append(_post(rows, event))
        elif kind is PortfolioOpened:
            rows.portfolios.append(event.portfolio)
            growth.append(("fork", _portfolio_opened(rows, event.portfolio)))
            for account in event.accounts:
                open_account(rows, account)
        elif kind is PortfolioMerged:
            assert all(portfolio_id != event.portfolio_id for portfolio_id, _ in rows.merged), "merged twice"
            rows.merged.append((event.portfolio_id, event.at))
            growth.append(("merge", _portfolio_merged(rows, event)))
        else:
            _apply_account_event(rows, event)
    rows.transactions.extend(transactions)
    for leg_kind, outbox in growth:
        _complete_growth_event(outbox, [t for t in rows.transactions if t.kind == leg_kind])
    return transactions


def open_account(rows: Rows, account: Account) -> None:
    assert account.id not in rows.states, f"account {account.id} exists"
    rows.states[account.id] = account
    rows.created.append(account.id)
    # The account as GET /v1/accounts/{id} names it: `deployable` too, which is zero for
    # an account that opens empty (as every account does; its funding legs follow).
    assert account.balance == 0, f"account {account.id} opens with a balance"
    _event(rows, "account.opened", {**msgspec.structs.asdict(account), "deployable": 0}, account.created_at,
           account_id=account.id, portfolio_id=account.portfolio_id)


def transfer_events(rows: Rows, transfer: Transfer) -> None:
    """A transfer's outbox: one `transfer.posted` per owner it touches, each carrying
    that owner's legs (an owner-scoped feed never shows another owner's balance)."""
    by_owner: dict[str, list[Transaction]] = {}
    for leg in transfer.legs:
        by_owner.setdefault(rows.states[leg.account_id].owner, []).append(leg)
    for legs in by_owner.values():
        whole = len(legs) == len(transfer.legs)
        payload = transfer if whole else msgspec.structs.replace(transfer, legs=legs)
        first = rows.states[legs[0].account_id]
        _event(rows, "transfer.posted", payload, transfer.created_at, account_id=first.id,
               portfolio_id=first.portfolio_id, correlation_id=transfer.id,
               # Stored only when its entries would not rebuild it (an owner's share of
               # the legs, a transfer that forked its payee's portfolio, a clock not in
               # UTC).
               derived=whole and transfer.created_at.tzinfo is timezone.utc
               and transfer_of(transfer.legs) == transfer)


def transfer_of(legs: list[Transaction]) -> Transfer | None:
    """The transfer whose two legs (its entries, in any order) these are, as the engine
    replies with it and its `transfer.posted` event carries it when it forked nothing;
    None if they are not one transfer's debit and credit."""
    if len(legs) != 2:
        return None
    debit, credit = legs if legs[0].direction == "debit" else (legs[1], legs[0])
    if debit.direction != "debit" or credit.direction != "credit" or debit.kind != "transfer":
        return None
    return Transfer(id=debit.correlation_id, kind="transfer", from_account=debit.account_id,
                    to_account=credit.account_id, amount=debit.amount, memo=debit.memo, created_at=debit.created_at,
                    legs=[debit, credit])


def _event(rows: Rows, kind: str, payload, at: datetime, *, account_id=None, portfolio_id=None,
           correlation_id=None, derived=False, entry_sequence=None) -> None:
    rows.outbox.append(OutboxRow(kind, account_id, portfolio_id, correlation_id, payload, at, derived,
                                 entry_sequence))


def _post(rows: Rows, event: LegPosted) -> Transaction:
    leg = event.leg
    current = rows.states[leg.account_id]
    assert current.status == "active", f"{current.id} is {current.status}"
    after = mutate(current, event)
    rows.states[leg.account_id] = after
    transaction = Transaction(
        id=leg.id, kind=leg.kind, account_id=leg.account_id, counterparty_account_id=leg.counterparty_account_id,
        amount=leg.amount, direction=leg.direction, balance_after=after.balance, memo=leg.memo,
        effective_date=leg.effective_date, created_at=leg.created_at, correlation_id=leg.correlation_id,
        sequence=after.version)
    if leg.kind not in MULTI_LEG_KINDS:
        # Its payload is the entry itself: derived, never stored twice. The entry's time
        # comes back from the database in UTC, so it is encoded the same only if it was
        # in UTC (the engine's clock is; a clock given to `Engine` may not be).
        _event(rows, "transaction.posted", transaction, leg.created_at, account_id=leg.account_id,
               portfolio_id=after.portfolio_id, correlation_id=leg.correlation_id,
               derived=leg.created_at.tzinfo is timezone.utc, entry_sequence=transaction.sequence)
    return transaction


def _portfolio_opened(rows: Rows, portfolio: Portfolio) -> OutboxRow:
    kind = "portfolio.forked" if portfolio.is_unit else "portfolio.opened"
    _event(rows, kind, {"portfolio": portfolio, "amount": 0, "from_account": None, "legs": []},
           portfolio.created_at, portfolio_id=portfolio.id)
    return rows.outbox[-1]


def _portfolio_merged(rows: Rows, event: PortfolioMerged) -> OutboxRow:
    _event(rows, "portfolio.merged", {"portfolio_id": event.portfolio_id, "amount": 0, "to_account": None,
                                      "legs": []}, event.at, portfolio_id=event.portfolio_id)
    return rows.outbox[-1]


def _complete_growth_event(outbox: OutboxRow, legs: list[Transaction]) -> None:
    """Fills in a fork's (amount, from_account) or a merge's (amount, to_account) event
    from its legs, and the fields its operation's reply has; a root portfolio's opening
    has no legs (`describe_opening` names its event)."""
    payload = outbox.payload
    payload["legs"] = legs
    if not legs:
        return
    if "from_account" in payload:
        moved = [leg for leg in legs if leg.direction == "debit"]
        payload["from_account"] = moved[0].account_id
    else:
        moved = [leg for leg in legs if leg.direction == "credit"]
        payload["to_account"] = moved[0].account_id
    payload["amount"] = sum(leg.amount for leg in moved)
    outbox.correlation_id = moved[0].correlation_id
    # The names of the operation's reply (POST .../fork, GET /v1/forks|merges/{id}).
    payload.update(id=outbox.correlation_id, kind=legs[0].kind, portfolio_id=outbox.portfolio_id,
                   created_at=legs[0].created_at)


def describe_opening(rows: Rows, view: Any) -> None:
    """A root portfolio's `portfolio.opened` event also carries the fields of the reply
    to POST /v1/portfolios (`view`, an `engine.reports.PortfolioView`), by their names."""
    for outbox in rows.outbox:
        if outbox.type == "portfolio.opened":
            outbox.payload.update(msgspec.structs.asdict(view))


def _apply_account_event(rows: Rows, event: Event) -> None:
    current = rows.states[event.account_id]
    if isinstance(event, StatusChanged):
        transition(current, event.status)
        assert event.status != "closed" or current.balance == 0, "closing a non-empty account"
    after = mutate(current, event)
    rows.states[event.account_id] = after
    match event:
        case StatusChanged(status=status, at=at):
            # `id` and `status` are the account's names in GET /v1/accounts/{id}.
            _event(rows, "account.status_changed", {"account_id": after.id, "id": after.id, "status": status}, at,
                   account_id=after.id, portfolio_id=after.portfolio_id)
        case Reinvested(at=at):
            rows.reinvestments.append(event)
            _event(rows, "account.reinvested", event, at, account_id=after.id, portfolio_id=after.portfolio_id)
        case Renamed():
            pass
