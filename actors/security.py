"""Tokens and the audit log, for the engine: creating and revoking API tokens (their
secrets are shown once and stored only as SHA-256 hashes), resolving a presented secret
to its principal, recording outcomes the commit of a change did not record (refusals,
replays, refused access), paging through the audit log and verifying its hash chain.

Every write here goes through the engine's one writer, so a token's creation or
revocation and its audit record commit together, and the audit chain stays in commit
order."""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from engine import limits
from engine.audit import EMBEDDED, ROLES, AuditContext, ChainCheck, Principal
from engine.errors import NotFound, ValidationFailed
from engine.text import storable
from actors.ids import new_id, next_op_id
from persistence.writer import AuditEntry, WriteOp

if TYPE_CHECKING:
    from actors.api import Engine

log = logging.getLogger("alluse.security")

SECRET_PREFIX = "alu_"
BOOTSTRAP = Principal(token_id="bootstrap-admin", role="admin")
VERIFY_PAGE_SIZE = 5000
# Outcome records waiting for the writer (while the database is away); past this the
# oldest are dropped and counted.
AUDIT_BACKLOG_MAX = 10_000
AUDIT_BACKLOG_RETRY_S = 0.5
AUDIT_BACKLOG_CHUNK = 1000


class TokenInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A token as the API shows it: never its secret."""

    id: str
    name: str
    role: str
    owner: str | None = None
    created_by: str
    created_at: datetime
    revoked_at: datetime | None = None


class CreatedToken(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to creating a token: the only time its secret is shown (`token`; null
    in the answer to a retry with the same idempotency key)."""

    id: str
    name: str
    role: str
    owner: str | None = None
    token: str | None
    created_at: datetime


class AuditVerification(msgspec.Struct, frozen=True, kw_only=True):
    valid: bool
    records: int
    first_bad_record: int | None = None
    reason: str | None = None


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class TokenRow(msgspec.Struct, frozen=True, kw_only=True):
    """What the writer stores of a new token."""

    id: str
    name: str
    role: str
    owner: str | None
    secret_hash: str
    created_by: str
    created_at: datetime


class Security:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        # secret hash -> the token's principal; only active tokens are here.
        self._active: dict[str, Principal] = {}
        self._by_id: dict[str, str] = {}
        # Outcome records not yet handed to the writer (`record_later`).
        self._backlog: collections.deque[AuditEntry] = collections.deque()
        self._backlog_task: asyncio.Task | None = None
        self.records_dropped = 0

    async def load(self) -> None:
        self._active.clear()
        self._by_id.clear()
        for row in await self.engine.store.tokens():
            if row["revoked_at"] is None:
                self._remember(row["id"], row["role"], row["owner"], row["secret_hash"])

    def _remember(self, token_id: str, role: str, owner: str | None, hashed: str) -> None:
        self._active[hashed] = Principal(token_id=token_id, role=role, owner=owner)
        self._by_id[token_id] = hashed

    # -- authentication ----------------------------------------------------------------
    def authenticate(self, secret: str) -> Principal | None:
        """The principal of a presented API token, or None (unknown or revoked). The
        bootstrap admin token is the gateway's to check (it comes from its settings)."""
        if not secret.startswith(SECRET_PREFIX) or len(secret) > limits.TOKEN_LENGTH_MAX:
            return None
        return self._active.get(secret_hash(secret))

    # -- tokens --------------------------------------------------------------------------
    async def create_token(self, *, name: str, role: str, owner: str | None = None,
                           context: AuditContext | None = None, idempotency_key: str | None = None) -> CreatedToken:
        """A new token; its secret is in this answer only (the table keeps its hash). With
        an `idempotency_key`, a retry answers with the same token and makes no second
        one, but without the secret (`token` is null): the key table keeps no secret."""
        _check_text("name", name, limits.NAME_LENGTH_MAX)
        if role not in ROLES:
            raise ValidationFailed(f"role must be one of {', '.join(ROLES)}", {"field": "role"})
        if owner is not None:
            _check_text("owner", owner, limits.OWNER_LENGTH_MAX)
        if idempotency_key is None:
            return await self._create_token(name, role, owner, context, None)
        request = {"name": name, "role": role, "owner": owner}   # what the key is bound to
        return await self.engine.dispatch.keyed(
            idempotency_key, ("create_token", None, request), CreatedToken,
            lambda claim: self._create_token(name, role, owner, context, claim))

    async def _create_token(self, name: str, role: str, owner: str | None, context: AuditContext | None,
                            claim) -> CreatedToken:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        hashed = secret_hash(secret)
        token_id = new_id("tok")
        context = context or AuditContext(EMBEDDED)
        row = TokenRow(id=token_id, name=name, role=role, owner=owner, secret_hash=hashed,
                       created_by=context.principal.token_id, created_at=self.engine.clock())
        created = CreatedToken(id=token_id, name=name, role=role, owner=owner, token=secret, created_at=row.created_at)
        await self._write(context, "create_token", token_id, {"role": role, "owner": owner, "name": name},
                          tokens=(row,), idempotency=claim, stored=msgspec.structs.replace(created, token=None))
        self._remember(token_id, role, owner, hashed)
        return created

    async def revoke_token(self, token_id: str, *, context: AuditContext | None = None) -> TokenInfo:
        """Revokes at once: the token stops working before the revocation is written."""
        row = await self.engine.store.token(token_id)
        if row is None:
            raise NotFound("no such token", {"token_id": token_id})
        hashed = self._by_id.pop(token_id, None)
        if hashed is not None:
            self._active.pop(hashed, None)
        if row["revoked_at"] is not None:
            return _token_info(row)
        now = self.engine.clock()
        await self._write(context or AuditContext(EMBEDDED), "revoke_token", token_id, {},
                          revocations=((token_id, now),))
        return _token_info({**row, "revoked_at": now})

    async def list_tokens(self) -> list[TokenInfo]:
        return [_token_info(row) for row in await self.engine.store.tokens()]

    # -- audit ---------------------------------------------------------------------------
    async def record(self, context: AuditContext, action: str, target: str | None, outcome: str,
                     details: dict | None = None) -> None:
        """Appends one record that no change carries (a refusal, a replay, refused
        access); returns once it is committed."""
        await self._write(context, action, target, details or {}, outcome=outcome)

    def record_later(self, context: AuditContext, action: str, target: str | None, outcome: str,
                     details: dict | None = None) -> None:
        """`record` without waiting: the record goes to the writer now (or, while the
        database is away, waits in a bounded backlog that a task hands over once it is
        back). For the reply path, which must never wait for the audit log."""
        entry = AuditEntry(context=context, action=action, target=target, outcome=outcome, details=details or {})
        writer = self.engine.writer
        if writer is None:
            return  # a standby or a stopped engine records nothing
        if not self._backlog and writer.refusal is None:
            self._submit(entry)
            return
        self._keep(entry)

    def _submit(self, entry: AuditEntry) -> asyncio.Future:
        future = self.engine._loop.create_future()

        def done(_result, error):
            if error is not None:
                if getattr(error, "code", "") == "write_rejected":
                    self.records_dropped += 1   # the database refuses this record: never retry it
                    log.error("the database refused an audit record: %s", error)
                else:
                    self._keep(entry, front=True)
            if not future.done():
                future.set_result(error is None)

        self.engine.writer.enqueue(WriteOp(op_id=next_op_id(), accounts=(), done=done, audit=entry))
        return future

    def _keep(self, entry: AuditEntry, front: bool = False) -> None:
        backlog = self._backlog
        if front:
            backlog.appendleft(entry)
        else:
            backlog.append(entry)
        while len(backlog) > AUDIT_BACKLOG_MAX:
            backlog.pop() if front else backlog.popleft()
            self.records_dropped += 1
            log.warning("audit backlog full (%d records): an outcome record was dropped", AUDIT_BACKLOG_MAX)
        if self._backlog_task is None or self._backlog_task.done():
            self._backlog_task = asyncio.ensure_future(self._drain_backlog())

    async def _drain_backlog(self) -> None:
        """Hands the backlog to the writer in chunks once it takes writes again."""
        backlog = self._backlog
        while backlog:
            writer = self.engine.writer
            if writer is None:
                return
            if writer.refusal is not None or not writer.healthy:
                await asyncio.sleep(AUDIT_BACKLOG_RETRY_S)
                continue
            chunk = [backlog.popleft() for _ in range(min(len(backlog), AUDIT_BACKLOG_CHUNK))]
            results = await asyncio.gather(*(self._submit(entry) for entry in chunk))
            if not all(results):
                await asyncio.sleep(AUDIT_BACKLOG_RETRY_S)

    async def audit_page(self, *, after: int, limit: int) -> list:
        return await self.engine.store.audit_page(after=after, limit=limit)

    async def verify_audit(self) -> AuditVerification:
        """Recomputes the whole chain from the first record, page by page."""
        check, after = ChainCheck(), 0
        while True:
            page = await self.engine.store.audit_page(after=after, limit=VERIFY_PAGE_SIZE)
            for record in page:
                check.feed(record)
            if len(page) < VERIFY_PAGE_SIZE:
                break
            after = page[-1].seq
        return AuditVerification(valid=check.valid, records=check.records, first_bad_record=check.first_bad_record,
                                 reason=check.reason)

    async def _write(self, context: AuditContext, action: str, target: str | None, details: dict, *,
                     outcome: str = "committed", tokens: tuple = (), revocations: tuple = (), idempotency=None,
                     stored: Any = None) -> None:
        """Writes the record (and tokens, revocations) through the writer. With an
        idempotency key's claim, the key commits with them, `stored` as its answer; the
        claim is settled by the outcome, as an operation's reply settles it."""
        engine = self.engine
        engine.admission.admit()
        future = engine._loop.create_future()
        entry = AuditEntry(context=context, action=action, target=target, outcome=outcome, details=details)

        def done(result, error):
            if idempotency is not None:
                idempotency.settle(result, error)
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

        if idempotency is not None:
            idempotency.attached = True
        engine.writer.enqueue(WriteOp(op_id=next_op_id(), accounts=(), done=done, audit=entry, tokens=tokens,
                                      revocations=revocations, idempotency=idempotency, result=stored))
        await engine.admission.bounded(future)


def _check_text(field: str, value, length_max: int) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= length_max or storable(value) != value:
        # `storable`: no NUL, no unpaired surrogate (neither can be stored, and one in an
        # audit record used to fail the whole batch it was written with).
        raise ValidationFailed(f"{field} must be 1 to {length_max} characters of text", {"field": field})


def _token_info(row: dict) -> TokenInfo:
    return TokenInfo(id=row["id"], name=row["name"], role=row["role"], owner=row["owner"],
                     created_by=row["created_by"], created_at=row["created_at"], revoked_at=row["revoked_at"])

