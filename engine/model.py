"""Domain values. Frozen msgspec Structs: changed only with `msgspec.structs.replace`
inside pure functions. Stored event bodies live forever: new fields get defaults, field
types never change."""
from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from engine import limits
from engine.text import TEXT_PATTERN

AccountType = Literal["generation", "revenue", "compounding"]
AccountStatus = Literal["active", "frozen", "closed", "merged"]
Direction = Literal["credit", "debit"]
TradeKind = Literal["premium", "loss", "fee"]
EntryKind = Literal["deposit", "withdrawal", "premium", "loss", "fee", "transfer", "fork", "merge"]
PortfolioStatus = Literal["active", "merged"]

ACCOUNT_TYPES: tuple[str, ...] = ("generation", "revenue", "compounding")
ACCOUNT_STATUSES: tuple[str, ...] = ("active", "frozen", "closed", "merged")

# Every Struct here is `gc=False`: a value never refers back to itself (no cycles), so the
# cyclic garbage collector need not track the many short-lived values each operation
# makes (docs/decisions.md, "The garbage collector").

# PostgreSQL text cannot hold NUL; refuse it at the edge like any other bad value.
NO_NUL = r"^[^\x00]*$"
Amount = Annotated[int, Meta(ge=limits.AMOUNT_MIN_CENTS, le=limits.AMOUNT_MAX_CENTS)]
# Client text (engine.text): no control characters and no bidi embeddings, overrides or
# isolates, checked on decode. Names and owners are normalized further by the request
# types that carry them (`engine.requests`).
Name = Annotated[str, Meta(min_length=1, max_length=limits.NAME_LENGTH_MAX, pattern=TEXT_PATTERN)]
Owner = Annotated[str, Meta(min_length=1, max_length=limits.OWNER_LENGTH_MAX, pattern=TEXT_PATTERN)]
Memo = Annotated[str, Meta(max_length=limits.MEMO_LENGTH_MAX, pattern=TEXT_PATTERN)]


class Allocations(Struct, frozen=True, gc=False, kw_only=True):
    """Cumulative reinvestment allocations the strategy engine reads."""

    contracts: int = 0
    leaps: int = 0


class Account(Struct, frozen=True, gc=False, kw_only=True):
    id: str
    name: str
    type: AccountType
    status: AccountStatus = "active"
    owner: str
    portfolio_id: str | None = None
    # The root of the portfolio tree this account's portfolio belongs to (itself for a
    # root portfolio) and that portfolio's depth (0 for a root): the fork rule needs them.
    root_portfolio_id: str | None = None
    portfolio_depth: int = 0
    balance: int = 0
    baseline: int = 0
    allocations: Allocations = Allocations()
    # Net trade income (premiums less losses and fees) since the last reinvestment.
    trade_income_cents: int = 0
    last_reinvested_quarter: str | None = None
    version: int = 0
    opened_on: date
    latest_effective_date: date | None = None
    created_at: datetime
    updated_at: datetime


class Portfolio(Struct, frozen=True, gc=False, kw_only=True):
    """A root portfolio (Gen-Acc, Rev-Acc, Com-Acc) or a forked unit (Gen-Acc, Com-Acc).
    Portfolios form a tree through `parent_id`; every unit knows its root."""

    id: str
    name: str
    owner: str
    parent_id: str | None = None
    root_id: str
    depth: int = 0
    status: PortfolioStatus = "active"
    generation_account_id: str
    revenue_account_id: str | None = None
    compounding_account_id: str
    opened_on: date
    created_at: datetime
    merged_at: datetime | None = None

    @property
    def is_unit(self) -> bool:
        return self.parent_id is not None

    @property
    def account_ids(self) -> tuple[str, ...]:
        ids = (self.generation_account_id, self.revenue_account_id, self.compounding_account_id)
        return tuple(i for i in ids if i is not None)

class Leg(Struct, frozen=True, gc=False, kw_only=True):
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


class Growth(Struct, frozen=True, gc=False, kw_only=True):
    """What a credit did to the portfolio tree, in its reply: the fork it triggered (the
    fork's id, the new unit) and/or the merge that followed it."""

    fork_id: str | None = None
    unit_id: str | None = None
    merge_id: str | None = None


class Transaction(Struct, frozen=True, gc=False, kw_only=True):
    """A committed ledger entry (the public shape of SPEC section 4). `growth` is set only
    in the reply to the credit that forked or merged (null in lists and events)."""

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
    growth: Growth | None = None


class Transfer(Struct, frozen=True, gc=False, kw_only=True):
    """A multi-leg operation: `id` is its correlation id."""

    id: str
    kind: str
    from_account: str
    to_account: str
    amount: int
    memo: str | None = None
    created_at: datetime
    legs: list[Transaction]
    # Set when the credit to `to_account` forked its portfolio or a merge followed it.
    growth: Growth | None = None


class GrowthOperation(Struct, frozen=True, gc=False, kw_only=True):
    """A fork or a merge: `id` is its correlation id; `portfolio_id` is the unit created
    (fork) or emptied (merge)."""

    id: str
    kind: Literal["fork", "merge"]
    portfolio_id: str
    amount: int
    created_at: datetime
    legs: list[Transaction]


# Commands: what a caller asks of one account. Tagged so they can travel and be matched.
class Deposit(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    amount: int
    memo: str | None = None


class Withdraw(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    amount: int
    memo: str | None = None
    # An admin override of the account type's "no withdrawals" rule (audited with its reason).
    override: bool = False


class BookTrade(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    kind: TradeKind
    amount: int
    memo: str | None = None
    effective_date: date | None = None


class TransferDebit(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    to_account: str
    amount: int
    memo: str | None = None
    override: bool = False


class TransferCredit(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    from_account: str
    amount: int
    memo: str | None = None


class Rename(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    name: str


class ChangeStatus(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    status: AccountStatus


class UpdateAccount(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    """A PATCH: rename and/or change status, all or nothing."""

    name: str | None = None
    status: AccountStatus | None = None


class Close(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    pass


class Fork(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    """A manual fork of a portfolio Gen-Acc: `amount` (default: the whole surplus) must
    not exceed the surplus over its baseline."""

    amount: int | None = None


class MergeOut(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    """A unit account's part of a merge: all its money leaves, it becomes `merged`. All
    legs of one merge carry one effective date (see `growth.merge_date`)."""

    to_account: str
    effective_date: date | None = None


class MergeIn(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    """The root Com-Acc's part of a merge: it receives everything the unit held."""

    portfolio_id: str
    amount: int
    effective_date: date | None = None


class Reinvest(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    quarter: str


Command = Union[Deposit, Withdraw, BookTrade, TransferDebit, TransferCredit, Rename, ChangeStatus, UpdateAccount,
                Close, Fork, MergeOut, MergeIn, Reinvest]


# Events: what a decision says happened. Account events name their account; a decision
# on one account may also open a unit (a fork) or close a portfolio (a merge).
class LegPosted(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    leg: Leg

    @property
    def account_id(self) -> str:
        return self.leg.account_id


class StatusChanged(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    account_id: str
    status: AccountStatus
    at: datetime


class Renamed(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    account_id: str
    name: str
    at: datetime


class Reinvested(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    account_id: str
    quarter: str
    net_income: int
    contracts: int
    leaps: int
    at: datetime


class PortfolioOpened(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    """A portfolio and its accounts were opened (a root by its owner, a unit by a fork),
    with zero balances: the credit legs that follow fund them."""

    portfolio: Portfolio
    accounts: list[Account]
    account_id: None = None


class PortfolioMerged(Struct, frozen=True, gc=False, kw_only=True, tag=True):
    portfolio_id: str
    at: datetime
    account_id: None = None


Event = Union[LegPosted, StatusChanged, Renamed, Reinvested, PortfolioOpened, PortfolioMerged]

to_builtins = msgspec.to_builtins
