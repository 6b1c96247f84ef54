"""One batch of the writer, as the parameters of its one statement (`WRITE_BATCH`): the
decided rows of every operation in it, coalesced per table, each table's rows as one
JSON document (encoded here by msgspec, decoded by PostgreSQL's jsonb_to_recordset),
plus the counts the statement's guard checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from engine.ledger import OutboxRow
from engine.model import Account, Portfolio, Reinvested, Transaction

encode_json = msgspec.json.Encoder().encode


class AccountUpdate(msgspec.Struct):
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


class KeyRow(msgspec.Struct):
    key: str
    fingerprint: str
    response: str      # the stored result's JSON text (stored as its UTF-8 bytes)


@dataclass(slots=True)
class BatchRows:
    portfolios: list[Portfolio] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    merged: list[tuple[str, datetime]] = field(default_factory=list)
    reinvestments: list[Reinvested] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    keys: list[KeyRow] = field(default_factory=list)
    tokens: list = field(default_factory=list)
    revocations: list[tuple[str, datetime]] = field(default_factory=list)
    audit: list = field(default_factory=list)


TOKEN_ROW = ("id", "name", "role", "owner", "secret_hash", "created_by", "created_at")


def write_batch_args(inserts: dict[str, Account], updates: dict[str, Account], before: dict[str, int],
                     rows: BatchRows) -> tuple:
    """The parameters of `WRITE_BATCH`: one JSON document per table plus the expected
    counts of the guarded updates and of the idempotency keys."""
    changed = [AccountUpdate(s.id, s.name, s.status, s.balance, s.version, before[account_id],
                             s.latest_effective_date, s.updated_at, s.allocations.contracts, s.allocations.leaps,
                             s.trade_income_cents, s.last_reinvested_quarter)
               for account_id, s in updates.items() if s.version != before[account_id]]
    tokens = [{name: getattr(token, name) for name in TOKEN_ROW} for token in rows.tokens]
    return (_json(rows.portfolios), _json(list(inserts.values())),
            _json(rows.transactions), _json(changed),
            _json([{"id": portfolio_id, "merged_at": at} for portfolio_id, at in rows.merged]),
            _json(rows.reinvestments), _json(rows.outbox), _json(rows.keys), len(changed), len(rows.merged),
            _json(tokens), _json([{"id": token_id, "revoked_at": at} for token_id, at in rows.revocations]),
            _json(rows.audit), len(rows.revocations), len(rows.keys))


def _json(items) -> str:
    return encode_json(items).decode() if items else "[]"
