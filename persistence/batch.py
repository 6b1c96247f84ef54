"""One batch of the writer, in the shape the database takes it: the decided rows of every
operation in it, coalesced per table and laid out for PostgreSQL's cheapest bulk paths.

- Ledger entries, outbox events, audit records and account updates travel as one JSON
  document per table, each row an array in its table's column order (msgspec encodes
  them in C; asyncpg would check every element of typed arrays against
  collections.abc on the event loop, ~25 µs per operation). Events' payloads go beside
  their rows as a list of texts, each encoded once (None when derived from the entries);
  idempotency keys as rows too, a key's own answer as a JSON string holding its text
  (jsonb keeps a string's text exactly, and those bytes are what a retry gets).
- Each account the batch changes is updated once, however many of its operations touch
  it, guarded by the version the batch found.
- What few operations write (new accounts and portfolios, merges, reinvestments,
  tokens) has documents too, sent only when the batch has any.

Pure: no I/O. `persistence.store.write_batch` writes a `BatchWrite` in one statement."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from engine import audit
from engine.model import Account, Portfolio, Reinvested
from engine.text import storable

encode_json = msgspec.json.Encoder().encode

TOKEN_ROW = ("id", "name", "role", "owner", "secret_hash", "created_by", "created_at")


class EventRow(msgspec.Struct, gc=False, array_like=True):
    """One outbox event as the `events` table takes it, but its payload (encoded JSON, in
    `BatchWrite.payloads` at the same position, or None when it is derived from its
    entries: `engine.ledger.OutboxRow`)."""

    seq: int
    type: str
    account_id: str | None
    portfolio_id: str | None
    correlation_id: str | None
    created_at: datetime
    entry_sequence: int | None


class KeyRow(msgspec.Struct, gc=False, array_like=True):
    """One idempotency key: its answer is `response` (encoded JSON, as text: it travels as
    a JSON string, so the database stores its exact bytes), or the payload of the event
    numbered `event_seq` when the answer is that payload (migration 0008)."""

    key: str
    fingerprint: str
    response: str | None = None
    event_seq: int | None = None


class AuditRow(msgspec.Struct, gc=False, array_like=True):
    """One audit record, linked into the chain (`hash` covers `prev_hash`)."""

    seq: int
    at: datetime
    token_id: str | None
    role: str | None
    owner_scope: str | None
    action: str
    target: str | None
    request_id: str | None
    client: str | None
    outcome: str
    details: str
    prev_hash: str
    hash: str


class AccountUpdate(msgspec.Struct, gc=False, array_like=True):
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
    """Everything one batch writes. `entries` are the decided ledger entries; `updates` is
    the document of the accounts' guarded update; `rare` the documents of what few
    operations write (`rare_args`), or None. `args()` are the parameters of
    `persistence.store.WRITE_BATCH`."""

    entries: list[tuple] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    payloads: list[str | None] = field(default_factory=list)
    keys: list[KeyRow] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    updates: str = "[]"
    updates_expected: int = 0
    rare: tuple | None = None
    # `args()`, once encoded (a batch built ahead of its turn is encoded ahead too).
    encoded: tuple | None = None

    def args(self) -> tuple:
        """The parameters of `WRITE_BATCH`, or of `WRITE_BATCH_RARE` when `rare` is set."""
        if self.encoded is None:
            common = (self.updates, _json(self.keys), _json(self.entries), _json(self.events), self.payloads,
                      _json(self.audit), self.updates_expected)
            self.encoded = common if self.rare is None else (*common, *self.rare)
        return self.encoded


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
    """The decided entries as rows in `entries`' column order."""
    return [(t.id, t.account_id, t.sequence, t.kind, t.direction, t.amount, t.balance_after,
             t.counterparty_account_id, t.memo, t.correlation_id, t.effective_date, t.created_at)
            for t in transactions]


def account_updates(updates: dict[str, Account], before: dict[str, int]) -> tuple[str, int]:
    """The document of the batch's guarded account update (every account whose version
    moved), and their count."""
    rows = [AccountUpdate(s.id, s.name, s.status, s.balance, s.version, before[account_id], s.latest_effective_date,
                          s.updated_at, s.allocations.contracts, s.allocations.leaps, s.trade_income_cents,
                          s.last_reinvested_quarter)
            for account_id, s in updates.items() if s.version != before[account_id]]
    return _json(rows), len(rows)


def rare_args(rare: RareRows) -> tuple:
    """The rare rows' parameters of `WRITE_BATCH_RARE` ($8 to $15): one JSON document per
    table plus the expected counts of merges and revocations (its guard)."""
    tokens = [{name: getattr(token, name) for name in TOKEN_ROW} for token in rare.tokens]
    return (_json(rare.portfolios), _json(rare.accounts),
            _json([{"id": portfolio_id, "merged_at": at} for portfolio_id, at in rare.merged]),
            _json(rare.reinvestments), _json(tokens),
            _json([{"id": token_id, "revoked_at": at} for token_id, at in rare.revocations]),
            len(rare.merged), len(rare.revocations))


def audit_row(seq: int, at: datetime, at_text: str, entry: Any, details: dict, prev_hash: str) -> AuditRow:
    """One audit record as a row, linked after `prev_hash` (its hash as
    `engine.audit.record_hash` computes it; `at_text` is `at` in canonical form)."""
    context = entry.context
    principal = context.principal
    details_text = encode_json(details).decode()
    # A refused request is recorded as sent (its path segment, its request id), in the
    # form PostgreSQL's text can hold: a NUL in a URL must not keep it out of the log.
    action, target = storable(entry.action), storable(entry.target)
    request_id, client = storable(context.request_id), storable(context.client)
    record_hash = audit.hash_fields(seq, at_text, principal.token_id, principal.role, principal.owner,
                                    action, target, request_id, client, entry.outcome, details_text, prev_hash)
    return AuditRow(seq, at, principal.token_id, principal.role, principal.owner, action, target,
                    request_id, client, entry.outcome, details_text, prev_hash, record_hash)


def _json(items) -> str:
    return encode_json(items).decode() if items else "[]"

