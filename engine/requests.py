"""Request bodies of the public API. The gateway decodes JSON straight into these and
the embedding API converts its keyword arguments into them, so both validate alike:
integers only (no floats, strings or booleans), 1 <= amount <= 10^15, unknown fields
refused."""
from __future__ import annotations

from datetime import date
from typing import Annotated, Literal, get_args

from msgspec import Meta, Struct
from msgspec.structs import force_setattr

from engine import limits, text
from engine.model import NO_NUL, AccountType, Amount, Memo, Name, Owner, TradeKind

Quarter = Annotated[str, Meta(pattern=r"^[1-9][0-9]{3}-Q[1-4]$")]
Bps = Annotated[int, Meta(ge=-10_000, le=10_000)]
AccountId = Annotated[str, Meta(min_length=1, max_length=limits.ID_LENGTH_MAX, pattern=NO_NUL)]


class Request(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


def normalize_names(request: Struct) -> None:
    """Puts a request's `name` and `owner` in their one normal form (`engine.text`), in
    place, or raises `ValueError` (msgspec reports it as a validation error). Only the
    request types that carry a name or an owner call it: none of them is an operation on
    money, so the hot path never pays for it."""
    name = getattr(request, "name", None)
    if name is not None:
        force_setattr(request, "name", text.name(name, "name", limits.NAME_LENGTH_MAX))
    owner = getattr(request, "owner", None)
    if owner is not None:
        force_setattr(request, "owner", text.identifier(owner, "owner", limits.OWNER_LENGTH_MAX))


def normalized_owner(owner: str | None) -> str | None:
    """An owner given as a filter (a query parameter) in the form owners are stored in;
    `ValueError` when it could never match one."""
    return None if owner is None else text.identifier(owner, "owner", limits.OWNER_LENGTH_MAX)


class CreateAccountRequest(Request, kw_only=True):
    name: Name
    type: AccountType
    owner: Owner
    opened_on: date | None = None

    def __post_init__(self) -> None:
        normalize_names(self)


class UpdateAccountRequest(Request, kw_only=True):
    name: Name | None = None
    status: Literal["active", "frozen"] | None = None

    def __post_init__(self) -> None:
        normalize_names(self)


class CloseAccountRequest(Request, kw_only=True):
    pass


class MoneyRequest(Request, kw_only=True):
    amount: Amount
    memo: Memo | None = None


class DepositRequest(MoneyRequest, kw_only=True):
    pass


class WithdrawalRequest(MoneyRequest, kw_only=True):
    # Admins only: withdraw even where the account type refuses it (a Com-Acc); the
    # reason goes to the audit log.
    override_reason: Memo | None = None


class TradeRequest(MoneyRequest, kw_only=True):
    kind: TradeKind
    effective_date: date | None = None


class TransferRequest(MoneyRequest, kw_only=True):
    from_account: AccountId
    to_account: AccountId
    override_reason: Memo | None = None


class CreatePortfolioRequest(Request, kw_only=True):
    name: Name
    owner: Owner
    initial_capital: Amount
    opened_on: date | None = None

    def __post_init__(self) -> None:
        normalize_names(self)


class ReinvestRequest(Request, kw_only=True):
    quarter: Quarter


class ForkRequest(Request, kw_only=True):
    amount: Amount | None = None


class WeeklyReturns(Request, kw_only=True):
    generation: Bps = 0
    revenue: Bps = 0
    compounding: Bps = 0


# Basis points per account type; msgspec's JSON schema says nothing of the keys, so say it.
PerType = Annotated[dict[AccountType, Annotated[int, Meta(ge=0, le=10_000)]],
                    Meta(extra_json_schema={"propertyNames": {"enum": list(get_args(AccountType))}})]


class ProjectionRequest(Request, kw_only=True):
    """A projection; the optional fields override the configured rules for this run."""

    initial_capital: Amount
    weeks: Annotated[int, Meta(ge=1, le=2600)]
    weekly_return_bps: WeeklyReturns
    start_date: date | None = None
    include_weeks: bool = True
    fork_threshold_cents: Amount | None = None
    merge_threshold_cents: Amount | None = None
    cash_buffer_bps: PerType | None = None
    capital_share_bps: PerType | None = None


class FaultRequest(Request, kw_only=True):
    account_id: AccountId
    fault: Literal["crash"] = "crash"


class CreateTokenRequest(Request, kw_only=True):
    name: Name
    role: Literal["admin", "operator", "strategy", "viewer"]
    # Set: the token sees and touches only this owner's accounts and portfolios.
    owner: Owner | None = None

    def __post_init__(self) -> None:
        normalize_names(self)
