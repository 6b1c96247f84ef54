"""Domain values. Frozen msgspec Structs: changed only with `msgspec.structs.replace`
inside pure functions. Stored event bodies live forever: new fields get defaults, field
types never change."""
from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from engine import limits

AccountType = Literal["generation", "revenue", "compounding"]
AccountStatus = Literal["active", "frozen", "closed", "merged"]
Direction = Literal["credit", "debit"]
TradeKind = Literal["premium", "loss", "fee"]
EntryKind = Literal["deposit", "withdrawal", "premium", "loss", "fee", "transfer"]

ACCOUNT_TYPES: tuple[str, ...] = ("generation", "revenue", "compounding")
ACCOUNT_STATUSES: tuple[str, ...] = ("active", "frozen", "closed", "merged")

# PostgreSQL text cannot hold NUL; refuse it at the edge like any other bad value.
NO_NUL = r"^[^\x00]*$"
Amount = Annotated[int, Meta(ge=limits.AMOUNT_MIN_CENTS, le=limits.AMOUNT_MAX_CENTS)]
Name = Annotated[str, Meta(min_length=1, max_length=limits.NAME_LENGTH_MAX, pattern=NO_NUL)]
Owner = Annotated[str, Meta(min_length=1, max_length=limits.OWNER_LENGTH_MAX, pattern=NO_NUL)]
Memo = Annotated[str, Meta(max_length=limits.MEMO_LENGTH_MAX, pattern=NO_NUL)]


class Allocations(Struct, frozen=True, kw_only=True):
    """Cumulative reinvestment allocations the strategy engine reads."""

    contracts: int = 0
    leaps: int = 0


class Account(Struct, frozen=True, kw_only=True):
    id: str
    name: str
    type: AccountType
    status: AccountStatus = "active"
    owner: str
    portfolio_id: str | None = None
    balance: int = 0
    baseline: int = 0
    allocations: Allocations = Allocations()
    version: int = 0
    opened_on: date
    latest_effective_date: date | None = None
    created_at: datetime
    updated_at: datetime


class Leg(Struct, frozen=True, kw_only=True):
    """One ledger entry as decided; the writer adds `balance_after` and `sequence` when it
    commits the entry in order."""

    id: str
    account_id: str
    kind: EntryKind
    direction: Direction
    amount: int
    memo: str | None = None
    counterparty_account_id: str | None = None
    correlation_id: str | None = None
    effective_date: date
    created_at: datetime

    @property
    def delta(self) -> int:
        return self.amount if self.direction == "credit" else -self.amount


class Transaction(Struct, frozen=True, kw_only=True):
    """A committed ledger entry (the public shape of SPEC section 4)."""

    id: str
    kind: EntryKind
    account_id: str
    counterparty_account_id: str | None = None
    amount: int
    direction: Direction
    balance_after: int
    memo: str | None = None
    effective_date: date
    created_at: datetime
    correlation_id: str | None = None
    sequence: int


class Transfer(Struct, frozen=True, kw_only=True):
    """A multi-leg operation: `id` is its correlation id."""

    id: str
    kind: str
    from_account: str
    to_account: str
    amount: int
    memo: str | None = None
    created_at: datetime
    legs: list[Transaction]


# Commands: what a caller asks of one account. Tagged so they can travel and be matched.
class Deposit(Struct, frozen=True, kw_only=True, tag=True):
    amount: int
    memo: str | None = None


class Withdraw(Struct, frozen=True, kw_only=True, tag=True):
    amount: int
    memo: str | None = None


class BookTrade(Struct, frozen=True, kw_only=True, tag=True):
    kind: TradeKind
    amount: int
    memo: str | None = None
    effective_date: date | None = None


class TransferDebit(Struct, frozen=True, kw_only=True, tag=True):
    to_account: str
    amount: int
    memo: str | None = None


class TransferCredit(Struct, frozen=True, kw_only=True, tag=True):
    from_account: str
    amount: int
    memo: str | None = None


class Rename(Struct, frozen=True, kw_only=True, tag=True):
    name: str


class ChangeStatus(Struct, frozen=True, kw_only=True, tag=True):
    status: AccountStatus


class UpdateAccount(Struct, frozen=True, kw_only=True, tag=True):
    """A PATCH: rename and/or change status, all or nothing."""

    name: str | None = None
    status: AccountStatus | None = None


class Close(Struct, frozen=True, kw_only=True, tag=True):
    pass


Command = Union[Deposit, Withdraw, BookTrade, TransferDebit, TransferCredit, Rename, ChangeStatus, UpdateAccount,
                Close]


# Events: what a decision says happened to one account.
class LegPosted(Struct, frozen=True, kw_only=True, tag=True):
    leg: Leg


class StatusChanged(Struct, frozen=True, kw_only=True, tag=True):
    status: AccountStatus
    at: datetime


class Renamed(Struct, frozen=True, kw_only=True, tag=True):
    name: str
    at: datetime


Event = Union[LegPosted, StatusChanged, Renamed]

to_builtins = msgspec.to_builtins
