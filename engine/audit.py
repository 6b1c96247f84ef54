"""The audit log's pure core: who did what (the principal and its request), the record
that is stored, and the hash chain that makes tampering evident.

Every record holds the hash of the record before it; a record's hash covers every one of
its stored fields and that previous hash, so changing, removing or inserting any record
breaks the chain from there on. The writer assigns sequence numbers and hashes in commit
order (it is the only writer), so the chain is the order in which changes committed."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import msgspec

# The hash the first record chains to.
GENESIS_HASH = "0" * 64
ROLES = ("admin", "operator", "strategy", "viewer")


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who acts. `token_id` names the token (never its secret); `owner` is the owner
    scope of an owner-scoped token (None: every owner)."""

    token_id: str
    role: str
    owner: str | None = None


# The in-process embedding API is a trusted principal (it does no token checks).
EMBEDDED = Principal(token_id="embedded", role="admin")
# The engine's own schedule (quarterly reinvestment).
SCHEDULER = Principal(token_id="scheduler", role="admin")


class AuditContext:
    """What one request (or in-process call) is, for the audit records of what it does.
    `recorded` turns true once a commit carried a record of it, so the gateway knows
    whether it still has to record the request's outcome itself."""

    __slots__ = ("principal", "request_id", "client", "route", "reason", "recorded", "replayed")

    def __init__(self, principal: Principal, *, request_id: str = "", client: str = "", route: str = "",
                 reason: str | None = None):
        self.principal = principal
        self.request_id = request_id
        self.client = client
        self.route = route
        self.reason = reason
        self.recorded = False
        # Answered with an earlier request's result (same idempotency key).
        self.replayed = False


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One stored record. `details` is JSON text, hashed exactly as stored."""

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
    details: str
    prev_hash: str
    hash: str = ""


_encode = msgspec.json.Encoder().encode


def _canonical_time(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def canonical_time(at: datetime) -> str:
    return _canonical_time(at)


def hash_fields(seq: int, at_text: str, token_id: str, role: str, owner_scope: str | None, action: str,
                target: str | None, request_id: str, client: str, outcome: str, details: str,
                prev_hash: str) -> str:
    """SHA-256 over a record's fields but the hash itself, in a fixed order (`at_text` is
    the time in canonical form)."""
    return hashlib.sha256(_encode([seq, at_text, token_id, role, owner_scope, action, target, request_id, client,
                                   outcome, details, prev_hash])).hexdigest()


def record_hash(record: AuditRecord) -> str:
    """SHA-256 over every field but the hash itself, in a fixed order."""
    return hash_fields(record.seq, _canonical_time(record.at), record.token_id, record.role, record.owner_scope,
                       record.action, record.target, record.request_id, record.client, record.outcome,
                       record.details, record.prev_hash)


def chained(record: AuditRecord, prev_hash: str) -> AuditRecord:
    """The record linked after `prev_hash`, with its own hash."""
    linked = msgspec.structs.replace(record, prev_hash=prev_hash, hash="")
    return msgspec.structs.replace(linked, hash=record_hash(linked))


def new_record(*, seq: int, at: datetime, principal: Principal, action: str, target: str | None,
               request_id: str, client: str, outcome: str, details: dict, prev_hash: str) -> AuditRecord:
    record = AuditRecord(seq=seq, at=at, token_id=principal.token_id, role=principal.role,
                         owner_scope=principal.owner, action=action, target=target, request_id=request_id,
                         client=client, outcome=outcome, details=_encode(details).decode(), prev_hash=prev_hash)
    return chained(record, prev_hash)


class ChainCheck:
    """Checks records fed in sequence order; remembers the first one that breaks the
    chain (a wrong hash, a wrong link, or a gap in the sequence)."""

    def __init__(self) -> None:
        self.records = 0
        self.first_bad_record: int | None = None
        self.reason: str | None = None
        self._prev_hash = GENESIS_HASH
        self._prev_seq = 0

    def feed(self, record: AuditRecord) -> None:
        self.records += 1
        if self.first_bad_record is not None:
            return
        if record.seq != self._prev_seq + 1:
            self._bad(record.seq, f"sequence jumps from {self._prev_seq} to {record.seq}")
        elif record.prev_hash != self._prev_hash:
            self._bad(record.seq, "does not link to the record before it")
        elif record_hash(record) != record.hash:
            self._bad(record.seq, "its contents do not match its hash")
        self._prev_hash, self._prev_seq = record.hash, record.seq

    def _bad(self, seq: int, reason: str) -> None:
        self.first_bad_record, self.reason = seq, reason

    @property
    def valid(self) -> bool:
        return self.first_bad_record is None
