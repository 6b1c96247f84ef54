"""Every account rule as a pure function: `decide(account, command, ...)` returns the
events to record or raises `Refused`; `mutate(account, event)` returns the new state.
The live actors, the persistence writer's safety check and the tests all call these."""
from __future__ import annotations

from datetime import date, datetime

import msgspec
from msgspec import Struct
from msgspec.structs import replace

from engine import limits
from engine.errors import refuse
from engine.model import (
    Account, BookTrade, ChangeStatus, Close, Command, Deposit, Event, Leg, LegPosted,
    Rename, Renamed, StatusChanged, TransferCredit, TransferDebit, UpdateAccount, Withdraw,
)


class Rules(Struct, frozen=True, kw_only=True):
    """The configurable part of the rules (SPEC section 3 defaults)."""

    withdrawals_allowed: dict[str, bool] = msgspec.field(
        default_factory=lambda: {"generation": True, "revenue": True, "compounding": False})
    cash_buffer_bps: dict[str, int] = msgspec.field(
        default_factory=lambda: {"generation": 500, "revenue": 500, "compounding": 500})


DEFAULT_RULES = Rules()

# The account status machine in one table (h11 style): (from, to) pairs that are legal.
STATUS_TRANSITIONS: frozenset[tuple[str, str]] = frozenset({
    ("active", "frozen"),
    ("frozen", "active"),
    ("active", "closed"),
    ("frozen", "closed"),
    ("active", "merged"),
    ("frozen", "merged"),
})
TERMINAL_STATUSES = frozenset({"closed", "merged"})

TRADE_DIRECTIONS = {"premium": "credit", "loss": "debit", "fee": "debit"}


def open_account(*, account_id: str, name: str, account_type: str, owner: str, now: datetime,
                 opened_on: date | None = None, portfolio_id: str | None = None) -> Account:
    opened = opened_on or now.date()
    if opened > now.date():
        raise refuse("validation_failed", "opened_on may not be in the future", field="opened_on")
    return Account(id=account_id, name=name, type=account_type, owner=owner, portfolio_id=portfolio_id,
                   opened_on=opened, created_at=now, updated_at=now)


def deployable(account: Account, rules: Rules = DEFAULT_RULES) -> int:
    """Balance less the type's cash buffer, rounded down to the cent."""
    buffer_bps = rules.cash_buffer_bps.get(account.type, 0)
    return account.balance * (10_000 - buffer_bps) // 10_000


def transition(account: Account, target: str) -> None:
    """Refuses an illegal status change; returns quietly for a legal one."""
    if (account.status, target) not in STATUS_TRANSITIONS:
        raise refuse("account_not_active", f"account is {account.status}; cannot become {target}",
                     account_id=account.id, status=account.status)


def _change_status(account: Account, target: str, now: datetime) -> list[Event]:
    """The one way to change status: the table decides, and closing needs a zero balance."""
    transition(account, target)
    if target == "closed" and account.balance != 0:
        raise refuse("account_not_empty", "only an account with a zero balance can be closed",
                     account_id=account.id, balance=account.balance)
    return [StatusChanged(status=target, at=now)]


def _require_active(account: Account) -> None:
    if account.status != "active":
        raise refuse("account_not_active", f"account is {account.status}", account_id=account.id,
                     status=account.status)


def _require_funds(account: Account, amount: int) -> None:
    if account.balance < amount:
        raise refuse("insufficient_funds", "balance is lower than the amount", account_id=account.id,
                     balance=account.balance, amount=amount)


def _require_room(account: Account, amount: int) -> None:
    if account.balance + amount > limits.BALANCE_MAX_CENTS:
        raise refuse("balance_limit_exceeded", "the credit would take the balance past its limit",
                     account_id=account.id, balance_max=limits.BALANCE_MAX_CENTS)


def _require_withdrawable(account: Account, rules: Rules) -> None:
    if not rules.withdrawals_allowed.get(account.type, True):
        raise refuse("withdrawal_not_allowed", f"{account.type} accounts refuse withdrawals and transfers out",
                     account_id=account.id, type=account.type)


def _effective_date(account: Account, requested: date | None, today: date) -> date:
    if requested is None:
        return today
    if requested > today:
        raise refuse("validation_failed", "effective_date may not be in the future", field="effective_date")
    floor = max(account.opened_on, account.latest_effective_date or account.opened_on)
    if requested < floor:
        raise refuse("validation_failed", f"effective_date may not be before {floor.isoformat()}",
                     field="effective_date")
    return requested


def decide(account: Account, command: Command, *, transaction_id: str, now: datetime,
           correlation_id: str | None = None, rules: Rules = DEFAULT_RULES) -> list[Event]:
    """The events `command` causes on `account`, or a `Refused` exception. Pure."""
    today = now.date()

    def leg(kind, direction, amount, memo, counterparty=None, effective=None):
        return [LegPosted(leg=Leg(
            id=transaction_id, account_id=account.id, kind=kind, direction=direction, amount=amount,
            memo=memo, counterparty_account_id=counterparty, correlation_id=correlation_id,
            effective_date=effective or today, created_at=now))]

    match command:
        case Deposit(amount=amount, memo=memo):
            _require_active(account)
            _require_room(account, amount)
            return leg("deposit", "credit", amount, memo)
        case Withdraw(amount=amount, memo=memo):
            _require_active(account)
            _require_withdrawable(account, rules)
            _require_funds(account, amount)
            return leg("withdrawal", "debit", amount, memo)
        case BookTrade(kind=kind, amount=amount, memo=memo, effective_date=requested):
            _require_active(account)
            effective = _effective_date(account, requested, today)
            direction = TRADE_DIRECTIONS[kind]
            if direction == "credit":
                _require_room(account, amount)
            else:
                _require_funds(account, amount)
            return leg(kind, direction, amount, memo, effective=effective)
        case TransferDebit(to_account=target, amount=amount, memo=memo):
            _require_active(account)
            _require_withdrawable(account, rules)
            _require_funds(account, amount)
            return leg("transfer", "debit", amount, memo, counterparty=target)
        case TransferCredit(from_account=source, amount=amount, memo=memo):
            _require_active(account)
            _require_room(account, amount)
            return leg("transfer", "credit", amount, memo, counterparty=source)
        case Rename(name=name):
            if account.status in TERMINAL_STATUSES:
                raise refuse("account_not_active", f"account is {account.status}", account_id=account.id)
            return [Renamed(name=name, at=now)]
        case ChangeStatus(status=status):
            if status == account.status:
                return []
            return _change_status(account, status, now)
        case UpdateAccount(name=name, status=status):
            events: list[Event] = []
            if status is not None and status != account.status:
                events.extend(_change_status(account, status, now))
            elif account.status in TERMINAL_STATUSES:
                raise refuse("account_not_active", f"account is {account.status}", account_id=account.id)
            if name is not None and name != account.name:
                events.append(Renamed(name=name, at=now))
            return events
        case Close():
            return _change_status(account, "closed", now)
    raise AssertionError(f"unknown command {command!r}")


def apply_leg(balance: int, leg: Leg) -> int:
    """The balance after `leg`. The writer calls this on committed balances as a last
    safety check: a negative result is a bug upstream, never a client mistake."""
    after = balance + leg.delta
    assert 0 <= after <= limits.BIGINT_MAX, f"leg {leg.id} would take {leg.account_id} to {after}"
    return after


def mutate(account: Account, event: Event) -> Account:
    match event:
        case LegPosted(leg=leg):
            assert leg.account_id == account.id
            latest = account.latest_effective_date
            if latest is None or leg.effective_date > latest:
                latest = leg.effective_date
            return replace(account, balance=apply_leg(account.balance, leg), version=account.version + 1,
                           latest_effective_date=latest, updated_at=leg.created_at)
        case StatusChanged(status=status, at=at):
            return replace(account, status=status, version=account.version + 1, updated_at=at)
        case Renamed(name=name, at=at):
            return replace(account, name=name, version=account.version + 1, updated_at=at)
    raise AssertionError(f"unknown event {event!r}")


def mutate_all(account: Account, events: list[Event]) -> Account:
    for event in events:
        account = mutate(account, event)
    return account
