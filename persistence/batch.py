"""One batch of the writer, in the shape the database takes it: the decided rows of every
operation in it, coalesced per table and laid out for PostgreSQL's cheapest bulk paths.

- Ledger entries, outbox events, idempotency keys and audit records (the rows every
  operation writes) are tuples in their tables' column order, for binary `COPY`.
- Each account the batch changes is updated once, however many of its operations touch
  it, guarded by the version the batch found, from one jsonb document (msgspec encodes
  it in C; asyncpg would check every element of typed arrays against collections.abc).
- What few operations write (new accounts and portfolios, merges, reinvestments,
  tokens) travels as one jsonb document per table in one statement, sent only when the
  batch has any.

Pure: no I/O. `persistence.store.write_batch` writes a `BatchWrite` in one transaction."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from engine import audit
from engine.model import Account, Portfolio, Reinvested

encode_json = msgspec.json.Encoder().encode

ENTRY_COLUMNS = ("id", "account_id", "sequence", "kind", "direction", "amount", "balance_after",
                 "counterparty_account_id", "memo", "correlation_id", "effective_date", "created_at")
EVENT_COLUMNS = ("seq", "type", "account_id", "portfolio_id", "correlation_id", "payload", "created_at")
# A key's answer is `response`, or the payload of the event numbered `event_seq` when the
# answer is that payload (migration 0008).
KEY_COLUMNS = ("key", "fingerprint", "response", "event_seq")
AUDIT_COLUMNS = ("seq", "at", "token_id", "role", "owner_scope", "action", "target", "request_id", "client",
                 "outcome", "details", "prev_hash", "hash")
TOKEN_ROW = ("id", "name", "role", "owner", "secret_hash", "created_by", "created_at")


class AccountUpdate(msgspec.Struct, gc=False):
    """The columns a batch changes on an existing account, with the version it found."""

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


@dataclass(slots=True)
class BatchWrite:
    """Everything one batch writes. `updates` is the jsonb document of `UPDATE_ACCOUNTS`;
    `rare` the parameters of `WRITE_RARE`, or None."""

    entries: list[tuple] = field(default_factory=list)
    events: list[tuple] = field(default_factory=list)
    keys: list[tuple] = field(default_factory=list)
    audit: list[tuple] = field(default_factory=list)
    updates: str = "[]"
    updates_expected: int = 0
    rare: tuple | None = None


@dataclass(slots=True)
class RareRows:
    portfolios: list[Portfolio] = field(default_factory=list)
    accounts: list[Account] = field(default_factory=list)
    merged: list[tuple[str, datetime]] = field(default_factory=list)
    reinvestments: list[Reinvested] = field(default_factory=list)
    tokens: list = field(default_factory=list)
    revocations: list[tuple[str, datetime]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.portfolios or self.accounts or self.merged or self.reinvestments or self.tokens
                    or self.revocations)


def entry_rows(transactions) -> list[tuple]:
    return [(t.id, t.account_id, t.sequence, t.kind, t.direction, t.amount, t.balance_after,
             t.counterparty_account_id, t.memo, t.correlation_id, t.effective_date, t.created_at)
            for t in transactions]


def account_updates(updates: dict[str, Account], before: dict[str, int]) -> tuple[str, int]:
    """The document of `UPDATE_ACCOUNTS` for every account whose version moved, and their count."""
    rows = [AccountUpdate(s.id, s.name, s.status, s.balance, s.version, before[account_id], s.latest_effective_date,
                          s.updated_at, s.allocations.contracts, s.allocations.leaps, s.trade_income_cents,
                          s.last_reinvested_quarter)
            for account_id, s in updates.items() if s.version != before[account_id]]
    return _json(rows), len(rows)


def rare_args(rare: RareRows) -> tuple:
    """The parameters of `WRITE_RARE`: one JSON document per table plus the expected
    counts of merges and revocations (its guard)."""
    tokens = [{name: getattr(token, name) for name in TOKEN_ROW} for token in rare.tokens]
    return (_json(rare.portfolios), _json(rare.accounts),
            _json([{"id": portfolio_id, "merged_at": at} for portfolio_id, at in rare.merged]),
            _json(rare.reinvestments), _json(tokens),
            _json([{"id": token_id, "revoked_at": at} for token_id, at in rare.revocations]),
            len(rare.merged), len(rare.revocations))


def audit_row(seq: int, at: datetime, at_text: str, entry: Any, details: dict, prev_hash: str) -> tuple:
    """One audit record as a row, linked after `prev_hash` (its hash as
    `engine.audit.record_hash` computes it; `at_text` is `at` in canonical form)."""
    context = entry.context
    principal = context.principal
    details_text = encode_json(details).decode()
    record_hash = audit.hash_fields(seq, at_text, principal.token_id, principal.role, principal.owner,
                                    entry.action, entry.target, context.request_id, context.client,
                                    entry.outcome, details_text, prev_hash)
    return (seq, at, principal.token_id, principal.role, principal.owner, entry.action, entry.target,
            context.request_id, context.client, entry.outcome, details_text, prev_hash, record_hash)


def _json(items) -> str:
    return encode_json(items).decode() if items else "[]"
