"""The webhook tables (migration 0005): endpoints with their durable cursors, every
delivery attempt, dead letters. SQL is built once, here; driver errors leave as
`DatabaseUnavailable` (through `persistence.store.translated_errors`). The events
themselves are never read here: delivery reads them through the engine's event feed."""
from __future__ import annotations

import contextlib
from datetime import datetime

from engine.errors import KeyCommitted
from persistence.store import Store, key_answers, translated_errors

ENDPOINT_COLUMNS = ("id, url, description, event_types, owner, enabled, disabled_reason, secret, previous_secret, "
                    "previous_secret_expires_at, cursor, last_success_at, created_by, created_at, updated_at")
ATTEMPT_COLUMNS = ("id, endpoint_id, event_seq, message_id, attempt, at, outcome, status, latency_ms, "
                   "response_excerpt, error")
DEAD_LETTER_COLUMNS = "endpoint_id, event_seq, event_type, state, attempts, last_outcome, dead_at"

INSERT_ENDPOINT = (f"INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}) VALUES "
                   "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)")
# The fields an update may change (the caller passes them all, changed or not).
UPDATE_ENDPOINT = ("UPDATE webhook_endpoints SET url = $2, description = $3, event_types = $4, enabled = $5, "
                   "disabled_reason = $6, updated_at = $7 WHERE id = $1")
ROTATE_SECRET = ("UPDATE webhook_endpoints SET secret = $2, previous_secret = $3, previous_secret_expires_at = $4, "
                 "updated_at = $5 WHERE id = $1")
INSERT_KEY = ("INSERT INTO idempotency_keys (key, fingerprint, response) VALUES ($1, $2, $3) "
              "ON CONFLICT (key) DO NOTHING RETURNING 1")
SELECT_ENDPOINT = f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1"
SELECT_ENDPOINT_FOR_UPDATE = SELECT_ENDPOINT + " FOR UPDATE"
SELECT_ENDPOINTS = f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints ORDER BY created_at, id"
DELETE_ENDPOINT = "DELETE FROM webhook_endpoints WHERE id = $1"
# The cursor only moves forward, whoever writes it.
ADVANCE_CURSOR = ("UPDATE webhook_endpoints SET cursor = greatest(cursor, $2), "
                  "last_success_at = coalesce($3, last_success_at) WHERE id = $1")
DISABLE = "UPDATE webhook_endpoints SET enabled = false, disabled_reason = $2, updated_at = $3 WHERE id = $1"
# Attempts of an endpoint deleted meanwhile are dropped (not an error).
INSERT_ATTEMPT = ("INSERT INTO webhook_attempts (endpoint_id, event_seq, message_id, attempt, at, outcome, status, "
                  "latency_ms, response_excerpt, error) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 "
                  "WHERE EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = $1)")
SELECT_ATTEMPTS = (f"SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE endpoint_id = $1 AND id > $2 "
                   "ORDER BY id LIMIT $3")
# The newest first: what the console shows of an endpoint's recent history.
SELECT_LATEST_ATTEMPTS = (f"SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE endpoint_id = $1 "
                          "ORDER BY id DESC LIMIT $2")
# Keeps the newest `$2` attempts of an endpoint (the history is bounded).
PRUNE_ATTEMPTS = ("DELETE FROM webhook_attempts WHERE endpoint_id = $1 AND id <= "
                  "(SELECT id FROM webhook_attempts WHERE endpoint_id = $1 ORDER BY id DESC OFFSET $2 LIMIT 1)")
INSERT_DEAD_LETTER = (f"INSERT INTO webhook_dead_letters ({DEAD_LETTER_COLUMNS}) VALUES ($1, $2, $3, 'dead', $4, $5, $6) "
                      "ON CONFLICT (endpoint_id, event_seq) DO UPDATE SET state = 'dead', "
                      "attempts = webhook_dead_letters.attempts + excluded.attempts, "
                      "last_outcome = excluded.last_outcome, dead_at = excluded.dead_at")
SELECT_DEAD_LETTERS = (f"SELECT {DEAD_LETTER_COLUMNS} FROM webhook_dead_letters WHERE endpoint_id = $1 "
                       "AND event_seq > $2 ORDER BY event_seq LIMIT $3")
SELECT_REDELIVERING = (f"SELECT {DEAD_LETTER_COLUMNS} FROM webhook_dead_letters WHERE endpoint_id = $1 "
                       "AND state = 'redelivering' ORDER BY event_seq LIMIT $2")
REDELIVER_ONE = ("UPDATE webhook_dead_letters SET state = 'redelivering' WHERE endpoint_id = $1 AND event_seq = $2 "
                 f"RETURNING {DEAD_LETTER_COLUMNS}")
REDELIVER_ALL = "UPDATE webhook_dead_letters SET state = 'redelivering' WHERE endpoint_id = $1 AND state = 'dead'"
DELETE_DEAD_LETTER = "DELETE FROM webhook_dead_letters WHERE endpoint_id = $1 AND event_seq = $2"
COUNT_DEAD_LETTERS = "SELECT endpoint_id, count(*) AS n FROM webhook_dead_letters GROUP BY endpoint_id"


class WebhookStore:
    """The webhook tables over the engine's connection pool."""

    def __init__(self, store: Store):
        self.store = store

    @contextlib.asynccontextmanager
    async def transaction(self):
        """A pooled connection in a transaction: a management change and its audit
        record are made while it is open (see `actors.webhooks`)."""
        async with translated_errors(), self.store.pool.acquire() as conn, conn.transaction():
            yield conn

    async def endpoints(self) -> list[dict]:
        async with translated_errors():
            return [dict(row) for row in await self.store.pool.fetch(SELECT_ENDPOINTS)]

    async def endpoint(self, endpoint_id: str, conn=None) -> dict | None:
        async with translated_errors():
            if conn is not None:
                row = await conn.fetchrow(SELECT_ENDPOINT_FOR_UPDATE, endpoint_id)
            else:
                row = await self.store.pool.fetchrow(SELECT_ENDPOINT, endpoint_id)
        return dict(row) if row else None

    async def insert_endpoint(self, conn, row: dict) -> None:
        columns = [name.strip() for name in ENDPOINT_COLUMNS.split(",")]
        async with translated_errors():
            await conn.execute(INSERT_ENDPOINT, *[row[name] for name in columns])

    async def insert_key(self, conn, key: str, fingerprint: str, response: bytes) -> None:
        """Commits an idempotency key with the change made on `conn` (its answer stored as
        `response`), or raises `KeyCommitted` with the key's stored answer when the key
        committed before (the caller's transaction then rolls back: nothing is made
        twice). A transaction holding the same key meanwhile is waited for."""
        async with translated_errors():
            inserted = await conn.fetchval(INSERT_KEY, key, fingerprint, response)
            if inserted is None:
                stored = await key_answers(conn, [key])
        if inserted is None:
            raise KeyCommitted(*stored[key])

    async def update_endpoint(self, conn, row: dict) -> None:
        async with translated_errors():
            await conn.execute(UPDATE_ENDPOINT, row["id"], row["url"], row["description"], row["event_types"],
                               row["enabled"], row["disabled_reason"], row["updated_at"])

    async def rotate_secret(self, conn, endpoint_id: str, secret: str, previous: str, expires_at: datetime,
                            at: datetime) -> None:
        async with translated_errors():
            await conn.execute(ROTATE_SECRET, endpoint_id, secret, previous, expires_at, at)

    async def delete_endpoint(self, conn, endpoint_id: str) -> None:
        async with translated_errors():
            await conn.execute(DELETE_ENDPOINT, endpoint_id)

    async def advance_cursor(self, endpoint_id: str, seq: int, succeeded_at: datetime | None = None) -> None:
        async with translated_errors():
            await self.store.pool.execute(ADVANCE_CURSOR, endpoint_id, seq, succeeded_at)

    async def disable(self, endpoint_id: str, reason: str, at: datetime) -> None:
        async with translated_errors():
            await self.store.pool.execute(DISABLE, endpoint_id, reason, at)

    async def record_attempt(self, endpoint_id: str, *, event_seq: int, message_id: str, attempt: int, at: datetime,
                             outcome: str, status: int | None, latency_ms: float, excerpt: str | None,
                             error: str | None) -> None:
        async with translated_errors():
            await self.store.pool.execute(INSERT_ATTEMPT, endpoint_id, event_seq, message_id, attempt, at, outcome,
                                          status, latency_ms, excerpt, error)

    async def save_progress(self, attempts: list[tuple], cursors: list[tuple[str, int, datetime | None]]) -> None:
        """Attempts (rows of INSERT_ATTEMPT's parameters) and advanced cursors, in one
        transaction that does not wait for its WAL flush: losing the last moments of
        progress in a power cut only means those events are sent again (at least once),
        and a delivery does not wait for a disk flush."""
        async with translated_errors(), self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit TO off")
            if attempts:
                await conn.executemany(INSERT_ATTEMPT, attempts)
            if cursors:
                await conn.executemany(ADVANCE_CURSOR, cursors)

    async def attempts(self, endpoint_id: str, *, after: int, limit: int) -> list[dict]:
        async with translated_errors():
            return [dict(row) for row in await self.store.pool.fetch(SELECT_ATTEMPTS, endpoint_id, after, limit)]

    async def latest_attempts(self, endpoint_id: str, *, limit: int) -> list[dict]:
        async with translated_errors():
            return [dict(row) for row in await self.store.pool.fetch(SELECT_LATEST_ATTEMPTS, endpoint_id, limit)]

    async def prune_attempts(self, endpoint_id: str, keep: int) -> None:
        async with translated_errors():
            await self.store.pool.execute(PRUNE_ATTEMPTS, endpoint_id, keep)

    async def dead_letter(self, endpoint_id: str, *, event_seq: int, event_type: str, attempts: int, outcome: str,
                          at: datetime) -> None:
        async with translated_errors():
            await self.store.pool.execute(INSERT_DEAD_LETTER, endpoint_id, event_seq, event_type, attempts, outcome,
                                          at)

    async def dead_letters(self, endpoint_id: str, *, after: int, limit: int) -> list[dict]:
        async with translated_errors():
            return [dict(r) for r in await self.store.pool.fetch(SELECT_DEAD_LETTERS, endpoint_id, after, limit)]

    async def redelivering(self, endpoint_id: str, limit: int) -> list[dict]:
        async with translated_errors():
            return [dict(r) for r in await self.store.pool.fetch(SELECT_REDELIVERING, endpoint_id, limit)]

    async def redeliver(self, conn, endpoint_id: str, event_seq: int | None) -> int:
        """Marks one dead letter (or, with None, all of them) for redelivery; how many."""
        async with translated_errors():
            if event_seq is None:
                done = await conn.execute(REDELIVER_ALL, endpoint_id)
                return int(done.split()[-1])
            return 1 if await conn.fetchrow(REDELIVER_ONE, endpoint_id, event_seq) else 0

    async def delivered_dead_letter(self, endpoint_id: str, event_seq: int) -> None:
        async with translated_errors():
            await self.store.pool.execute(DELETE_DEAD_LETTER, endpoint_id, event_seq)

    async def dead_letter_counts(self) -> dict[str, int]:
        async with translated_errors():
            return {row["endpoint_id"]: row["n"] for row in await self.store.pool.fetch(COUNT_DEAD_LETTERS)}
