"""Request bodies of the public API. The gateway decodes JSON straight into these and
the embedding API converts its keyword arguments into them, so both validate alike:
integers only (no floats, strings or booleans), 1 <= amount <= 10^15, unknown fields
refused."""
from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from msgspec import Meta, Struct

from engine import limits
from engine.model import NO_NUL, AccountType, Amount, Memo, Name, Owner, TradeKind

AccountId = Annotated[str, Meta(min_length=1, max_length=limits.ID_LENGTH_MAX, pattern=NO_NUL)]


class Request(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class CreateAccountRequest(Request, kw_only=True):
    name: Name
    type: AccountType
    owner: Owner
    opened_on: date | None = None


class UpdateAccountRequest(Request, kw_only=True):
    name: Name | None = None
    status: Literal["active", "frozen"] | None = None


class CloseAccountRequest(Request, kw_only=True):
    pass


class MoneyRequest(Request, kw_only=True):
    amount: Amount
    memo: Memo | None = None


class DepositRequest(MoneyRequest, kw_only=True):
    pass


class WithdrawalRequest(MoneyRequest, kw_only=True):
    pass


class TradeRequest(MoneyRequest, kw_only=True):
    kind: TradeKind
    effective_date: date | None = None


class TransferRequest(MoneyRequest, kw_only=True):
    from_account: AccountId
    to_account: AccountId
