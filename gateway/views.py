"""Public response shapes (SPEC section 4) and their rendering from domain values."""
from __future__ import annotations

from datetime import date, datetime

import msgspec
from msgspec import Struct

from engine.audit import AuditRecord
from engine.model import Account, Allocations, Transaction
from actors.security import TokenInfo
from persistence.store import StoredEvent
from engine.rules import Rules, deployable


class AccountView(Struct, frozen=True, kw_only=True):
    id: str
    name: str
    type: str
    status: str
    owner: str
    portfolio_id: str | None
    balance: int
    deployable: int
    baseline: int
    allocations: Allocations
    version: int
    opened_on: date
    created_at: datetime
    updated_at: datetime


class AccountPage(Struct, frozen=True, kw_only=True):
    items: list[AccountView]
    next_cursor: str | None = None


class TransactionPage(Struct, frozen=True, kw_only=True):
    items: list[Transaction]
    next_cursor: str | None = None


class EventPage(Struct, frozen=True, kw_only=True):
    items: list[StoredEvent]
    next_after: int
    # The same position as `next_after`, as the cursor every other list uses. A feed
    # always has one (poll it again for what commits next).
    next_cursor: str | None = None


class FaultArmed(Struct, frozen=True, kw_only=True):
    account_id: str
    fault: str
    armed: bool


class ErrorBody(Struct, frozen=True, kw_only=True):
    code: str
    message: str
    details: dict = {}


class ErrorResponse(Struct, frozen=True, kw_only=True):
    error: ErrorBody
    request_id: str


class HealthView(Struct, frozen=True, kw_only=True):
    status: str


def account_view(account: Account, rules: Rules) -> AccountView:
    return AccountView(
        id=account.id, name=account.name, type=account.type, status=account.status, owner=account.owner,
        portfolio_id=account.portfolio_id, balance=account.balance, deployable=deployable(account, rules),
        baseline=account.baseline, allocations=account.allocations, version=account.version,
        opened_on=account.opened_on, created_at=account.created_at, updated_at=account.updated_at)


encode = msgspec.json.Encoder().encode


class AuditRecordView(Struct, frozen=True, kw_only=True):
    """An audit record as the API shows it: `details` is an object. It is stored, and
    hashed, as JSON text; `details_text` keeps that exact text for checking a hash."""

    seq: int
    at: datetime
    token_id: str
    role: str
    owner_scope: str | None
    action: str
    target: str | None
    request_id: str
    client: str
    outcome: str
    details: dict
    details_text: str
    prev_hash: str
    hash: str


def audit_view(record: AuditRecord) -> AuditRecordView:
    try:
        details = msgspec.json.decode(record.details)
    except msgspec.DecodeError:
        details = {}
    if not isinstance(details, dict):
        details = {"value": details}
    fields = {name: getattr(record, name) for name in record.__struct_fields__ if name != "details"}
    return AuditRecordView(**fields, details=details, details_text=record.details)


class AuditPage(Struct, frozen=True, kw_only=True):
    items: list[AuditRecordView]
    next_cursor: str | None = None


class TokenPage(Struct, frozen=True, kw_only=True):
    items: list[TokenInfo]
