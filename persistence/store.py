"""The narrow interface to PostgreSQL: connect, migrate, read accounts and entries, and
write one batch of operations as one transaction. SQL is built once, here. Driver
errors leave this module as `DatabaseUnavailable`."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import resources

import asyncpg

from engine.errors import DatabaseUnavailable
from engine.model import Account, Allocations, Transaction

log = logging.getLogger("alluse.store")

ACCOUNT_COLUMNS = ("id, name, type, status, owner, portfolio_id, balance, baseline, allocation_contracts, "
                   "allocation_leaps, version, opened_on, latest_effective_date, created_at, updated_at")
ENTRY_COLUMNS = ("id, account_id, sequence, kind, direction, amount, balance_after, counterparty_account_id, "
                 "memo, correlation_id, effective_date, created_at")

SELECT_ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
SELECT_ENTRY = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id = $1"
SELECT_ENTRIES_PAGE = (f"SELECT {ENTRY_COLUMNS} FROM entries WHERE account_id = $1 AND sequence < $2 "
                       "ORDER BY sequence DESC LIMIT $3")
SELECT_ENTRIES_BY_CORRELATION = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE correlation_id = $1 ORDER BY direction DESC"
SELECT_IDEMPOTENCY = "SELECT fingerprint, response FROM idempotency_keys WHERE key = $1"

SELECT_ACCOUNTS = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY($1::text[])"

# One batch is one statement, hence one implicit transaction and one round trip: new
# accounts, new entries, account updates (each guarded by the version it was read at)
# and idempotency keys. Data-modifying CTEs always run to completion; the final SELECT
# divides by zero - failing, so rolling back, the whole statement - unless every
# guarded update found its row at the expected version.
WRITE_BATCH = f"""
WITH new_accounts AS (
    INSERT INTO accounts ({ACCOUNT_COLUMNS})
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                         $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::date[], $13::date[],
                         $14::timestamptz[], $15::timestamptz[])
    RETURNING 1
), new_entries AS (
    INSERT INTO entries ({ENTRY_COLUMNS})
    SELECT * FROM unnest($16::text[], $17::text[], $18::bigint[], $19::text[], $20::text[], $21::bigint[],
                         $22::bigint[], $23::text[], $24::text[], $25::text[], $26::date[], $27::timestamptz[])
    RETURNING 1
), changed AS (
    UPDATE accounts AS a
    SET name = u.name, status = u.status, balance = u.balance, version = u.version,
        latest_effective_date = u.latest_effective_date, updated_at = u.updated_at
    FROM unnest($28::text[], $29::text[], $30::text[], $31::bigint[], $32::bigint[], $33::bigint[], $34::date[],
                $35::timestamptz[]) AS u(id, name, status, balance, version, previous_version,
                                         latest_effective_date, updated_at)
    WHERE a.id = u.id AND a.version = u.previous_version
    RETURNING 1
), new_keys AS (
    INSERT INTO idempotency_keys (key, fingerprint, response)
    SELECT * FROM unnest($36::text[], $37::text[], $38::bytea[])
    ON CONFLICT (key) DO NOTHING
    RETURNING 1
)
SELECT 1 / (CASE WHEN (SELECT count(*) FROM changed) = $39 THEN 1 ELSE 0 END)"""

# Failures of the connection or the server: the outcome of a write in flight is unknown.
CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                     asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
                     OSError, asyncio.TimeoutError, ConnectionError)


class StatementRejected(Exception):
    """PostgreSQL refused a statement (a constraint, a value it cannot store, the batch's
    version guard): it did not commit. Only the writer sees this."""


def account_from_row(row) -> Account:
    return Account(
        id=row["id"], name=row["name"], type=row["type"], status=row["status"], owner=row["owner"],
        portfolio_id=row["portfolio_id"], balance=row["balance"], baseline=row["baseline"],
        allocations=Allocations(contracts=row["allocation_contracts"], leaps=row["allocation_leaps"]),
        version=row["version"], opened_on=row["opened_on"], latest_effective_date=row["latest_effective_date"],
        created_at=row["created_at"], updated_at=row["updated_at"])


def transaction_from_row(row) -> Transaction:
    return Transaction(
        id=row["id"], kind=row["kind"], account_id=row["account_id"],
        counterparty_account_id=row["counterparty_account_id"], amount=row["amount"],
        direction=row["direction"], balance_after=row["balance_after"], memo=row["memo"],
        effective_date=row["effective_date"], created_at=row["created_at"],
        correlation_id=row["correlation_id"], sequence=row["sequence"])


@contextlib.asynccontextmanager
async def translated_errors(rejections: bool = False):
    """Driver failures become `DatabaseUnavailable` (or, for the writer, a refused
    statement becomes `StatementRejected`); nothing above this sees asyncpg."""
    try:
        yield
    except CONNECTION_ERRORS as error:
        raise DatabaseUnavailable("the database is unavailable", {"reason": type(error).__name__}) from error
    except asyncpg.PostgresError as error:
        if rejections:
            raise StatementRejected(f"{type(error).__name__}: {error}") from error
        raise DatabaseUnavailable("the database refused the query", {"reason": type(error).__name__}) from error


class Store:
    """Reads over a connection pool, plus the helpers the writer uses on its own
    connection. One instance per engine."""

    def __init__(self, url: str, pool_size: int = 8, command_timeout_s: float = 10.0):
        self.url = url
        self.pool_size = pool_size
        self.command_timeout_s = command_timeout_s
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        async with translated_errors():
            self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size,
                                                  command_timeout=self.command_timeout_s)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def connect(self) -> asyncpg.Connection:
        """A dedicated connection (the writer's)."""
        async with translated_errors():
            return await asyncpg.connect(self.url, command_timeout=self.command_timeout_s)

    async def migrate(self) -> list[str]:
        """Applies the versioned SQL files in `persistence/migrations` that are not yet
        applied, each in its own transaction, under an advisory lock."""
        files = sorted((f.name, f) for f in resources.files("persistence.migrations").iterdir()
                       if f.name.endswith(".sql"))
        applied: list[str] = []
        async with translated_errors(), self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(7420001)")
            try:
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                                   "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
                done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                for name, file in files:
                    if name in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(file.read_text())
                        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", name)
                    applied.append(name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(7420001)")
        return applied

    async def ping(self) -> None:
        async with translated_errors():
            await self.pool.fetchval("SELECT 1", timeout=2.0)

    async def load_account(self, account_id: str) -> Account | None:
        async with translated_errors():
            row = await self.pool.fetchrow(SELECT_ACCOUNT, account_id)
        return account_from_row(row) if row else None

    async def list_accounts(self, *, limit: int, after_id: str | None = None, type: str | None = None,
                            status: str | None = None, owner: str | None = None,
                            portfolio_id: str | None = None) -> list[Account]:
        clauses, args = [], []
        for column, value in (("id >", after_id), ("type =", type), ("status =", status),
                              ("owner =", owner), ("portfolio_id =", portfolio_id)):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} ${len(args)}")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        args.append(limit)
        sql = f"SELECT {ACCOUNT_COLUMNS} FROM accounts {where} ORDER BY id LIMIT ${len(args)}"
        async with translated_errors():
            rows = await self.pool.fetch(sql, *args)
        return [account_from_row(r) for r in rows]

    async def get_transaction(self, transaction_id: str) -> Transaction | None:
        async with translated_errors():
            row = await self.pool.fetchrow(SELECT_ENTRY, transaction_id)
        return transaction_from_row(row) if row else None

    async def list_transactions(self, account_id: str, *, limit: int,
                                before_sequence: int | None = None) -> list[Transaction]:
        before = before_sequence if before_sequence is not None else 2**62
        async with translated_errors():
            rows = await self.pool.fetch(SELECT_ENTRIES_PAGE, account_id, before, limit)
        return [transaction_from_row(r) for r in rows]

    async def idempotent_response(self, key: str) -> tuple[str, bytes] | None:
        async with translated_errors():
            row = await self.pool.fetchrow(SELECT_IDEMPOTENCY, key)
        return (row["fingerprint"], bytes(row["response"])) if row else None

    async def fetch(self, sql: str, *args):
        """For tests and tools that check the database directly."""
        async with translated_errors():
            return await self.pool.fetch(sql, *args)
