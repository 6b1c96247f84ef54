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
from datetime import datetime

import msgspec

from engine.ledger import transfer_of
from engine.model import Account, Allocations, Portfolio, Transaction
from persistence.batch import BatchWrite, encode_json
from persistence.ledger_weeks import LedgerWeeks

log = logging.getLogger("alluse.store")

ACCOUNT_COLUMNS = ("id, name, type, status, owner, portfolio_id, balance, baseline, allocation_contracts, "
                   "allocation_leaps, version, opened_on, latest_effective_date, created_at, updated_at, "
                   "root_portfolio_id, portfolio_depth, trade_income_cents, last_reinvested_quarter")
PORTFOLIO_COLUMNS = ("id, name, owner, parent_id, root_id, depth, status, generation_account_id, revenue_account_id, "
                     "compounding_account_id, opened_on, created_at, merged_at")
EVENT_COLUMNS = "seq, type, account_id, portfolio_id, correlation_id, payload, created_at, entry_sequence"
ENTRY_COLUMNS = ("id, account_id, sequence, kind, direction, amount, balance_after, counterparty_account_id, "
                 "memo, correlation_id, effective_date, created_at")

SELECT_ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
SELECT_ENTRY = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id = $1"
SELECT_ENTRIES_PAGE = (f"SELECT {ENTRY_COLUMNS} FROM entries WHERE account_id = $1 AND sequence < $2 "
                       "ORDER BY sequence DESC LIMIT $3")
SELECT_ENTRIES_BY_CORRELATION = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE correlation_id = $1 ORDER BY direction DESC"
# A key's stored answer: its own copy, or its event's payload (json keeps the text as sent),
# or, when that payload is derived (migration 0009), what `derived_payloads` rebuilds from
# the event's entries (`key_answers`).
SELECT_IDEMPOTENCY_MANY = (
    "SELECT k.key, k.fingerprint, COALESCE(k.response, convert_to(e.payload::text, 'UTF8')) AS response, "
    "e.type, e.account_id, e.correlation_id, e.entry_sequence "
    "FROM idempotency_keys k LEFT JOIN events e ON e.seq = k.event_seq WHERE k.key = ANY($1::text[])")
# The entries a derived payload is rebuilt from: a transfer's by its correlation id, a
# single entry by its account and sequence (the primary key).
SELECT_ENTRIES_OF_TRANSFERS = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE correlation_id = ANY($1::text[])"
SELECT_ENTRIES_AT = (f"SELECT {ENTRY_COLUMNS} FROM entries JOIN unnest($1::text[], $2::bigint[]) AS r(a, s) "
                     "ON account_id = r.a AND sequence = r.s")
# Expired keys go in bounded chunks (the writer runs this between batches).
PURGE_IDEMPOTENCY = """DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM idempotency_keys WHERE created_at < $1 LIMIT $2))"""
SELECT_PORTFOLIO = f"SELECT {PORTFOLIO_COLUMNS} FROM portfolios WHERE id = $1"
SELECT_CHILD_PORTFOLIOS = f"SELECT {PORTFOLIO_COLUMNS} FROM portfolios WHERE parent_id = ANY($1::text[]) ORDER BY id"
SELECT_ACCOUNTS_BY_ID = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY($1::text[])"
SELECT_EVENTS_AFTER = f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"
SELECT_EVENT_SEQS_AFTER = "SELECT seq FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"
# The events of one owner's accounts and portfolios (an owner-scoped token's feed).
SELECT_OWNER_EVENTS_AFTER = (
    "SELECT e.seq, e.type, e.account_id, e.portfolio_id, e.correlation_id, e.payload, e.created_at, e.entry_sequence "
    "FROM events e "
    "LEFT JOIN accounts a ON a.id = e.account_id LEFT JOIN portfolios p ON p.id = e.portfolio_id "
    "WHERE e.seq > $1 AND coalesce(a.owner, p.owner) = $3 ORDER BY e.seq LIMIT $2")


# One batch is one statement (`write_batch`): one round trip, one implicit transaction,
# one fsync for many operations. The rows every operation writes travel as one jsonb
# document per table, each row an array in the column order of `persistence.batch`
# (msgspec encodes them in C; PostgreSQL parses each document once and reads the fields by
# position); events' payloads travel beside them as a text[] (stored as sent, checked
# once; NULL when derived from the entries, migration 0009), and a key's own answer as a
# JSON string in its row (a string's text is kept exactly: the bytes a retry gets; as an
# object, jsonb would reorder it, and a json document of objects cost ~1 µs more per key
# to take apart). Each changed account is updated once,
# guarded by the version the batch found; a guard that trips raises in
# `alluse_batch_guard`, and a key committed before raises in its unique index: either way
# nothing of the batch commits. Rare rows (new accounts and portfolios, merges,
# reinvestments, tokens) have documents too, in a longer statement used only by batches
# that have any (its empty parts cost ~2 µs per transfer).
_WRITE_COMMON = f"""
WITH changed AS (
    UPDATE accounts AS a
    SET name = u->>1, status = u->>2, balance = (u->>3)::bigint, version = (u->>4)::bigint,
        latest_effective_date = (u->>6)::date, updated_at = (u->>7)::timestamptz,
        allocation_contracts = (u->>8)::bigint, allocation_leaps = (u->>9)::bigint,
        trade_income_cents = (u->>10)::bigint, last_reinvested_quarter = u->>11
    FROM jsonb_array_elements($1::jsonb) AS u
    WHERE a.id = u->>0 AND a.version = (u->>5)::bigint
    RETURNING 1
), new_keys AS (
    INSERT INTO idempotency_keys (key, fingerprint, response, event_seq)
    SELECT k->>0, k->>1, convert_to(k->>2, 'UTF8'), (k->>3)::bigint
    FROM jsonb_array_elements($2::jsonb) AS k
), new_entries AS (
    INSERT INTO entries ({ENTRY_COLUMNS})
    SELECT e->>0, e->>1, (e->>2)::bigint, e->>3, e->>4, (e->>5)::bigint, (e->>6)::bigint, e->>7, e->>8, e->>9,
           (e->>10)::date, (e->>11)::timestamptz
    FROM jsonb_array_elements($3::jsonb) AS e
), new_events AS (
    INSERT INTO events ({EVENT_COLUMNS})
    SELECT (e->>0)::bigint, e->>1, e->>2, e->>3, e->>4, payload::json, (e->>5)::timestamptz, (e->>6)::bigint
    FROM ROWS FROM (jsonb_array_elements($4::jsonb), unnest($5::text[])) AS r(e, payload)
), new_audit AS (
    INSERT INTO audit_log (seq, at, token_id, role, owner_scope, action, target, request_id, client, outcome,
                           details, prev_hash, hash)
    SELECT (e->>0)::bigint, (e->>1)::timestamptz, e->>2, e->>3, e->>4, e->>5, e->>6, e->>7, e->>8, e->>9,
           e->>10, e->>11, e->>12
    FROM jsonb_array_elements($6::jsonb) AS e
)"""
# What few operations write: only in batches that have any (`BatchWrite.rare`).
_WRITE_RARE = f"""
, new_portfolios AS (
    INSERT INTO portfolios ({PORTFOLIO_COLUMNS})
    SELECT {PORTFOLIO_COLUMNS} FROM json_to_recordset($8::json) AS r(
        id text, name text, owner text, parent_id text, root_id text, depth integer, status text,
        generation_account_id text, revenue_account_id text, compounding_account_id text, opened_on date,
        created_at timestamptz, merged_at timestamptz)
), new_accounts AS (
    INSERT INTO accounts ({ACCOUNT_COLUMNS})
    SELECT id, name, type, status, owner, portfolio_id, balance, baseline, (allocations->>'contracts')::bigint,
           (allocations->>'leaps')::bigint, version, opened_on, latest_effective_date, created_at, updated_at,
           root_portfolio_id, portfolio_depth, trade_income_cents, last_reinvested_quarter
    FROM json_to_recordset($9::json) AS r(
        id text, name text, type text, status text, owner text, portfolio_id text, balance bigint, baseline bigint,
        allocations json, version bigint, opened_on date, latest_effective_date date, created_at timestamptz,
        updated_at timestamptz, root_portfolio_id text, portfolio_depth integer, trade_income_cents bigint,
        last_reinvested_quarter text)
), merged_portfolios AS (
    UPDATE portfolios AS p SET status = 'merged', merged_at = u.merged_at
    FROM json_to_recordset($10::json) AS u(id text, merged_at timestamptz)
    WHERE p.id = u.id AND p.status = 'active'
    RETURNING 1
), new_reinvestments AS (
    INSERT INTO reinvestments (account_id, quarter, net_income, contracts, leaps, created_at)
    SELECT account_id, quarter, net_income, contracts, leaps, at FROM json_to_recordset($11::json) AS r(
        account_id text, quarter text, net_income bigint, contracts bigint, leaps bigint, at timestamptz)
), new_tokens AS (
    INSERT INTO api_tokens (id, name, role, owner, secret_hash, created_by, created_at)
    SELECT id, name, role, owner, secret_hash, created_by, created_at FROM json_to_recordset($12::json) AS r(
        id text, name text, role text, owner text, secret_hash text, created_by text, created_at timestamptz)
), revoked_tokens AS (
    UPDATE api_tokens AS t SET revoked_at = u.revoked_at
    FROM json_to_recordset($13::json) AS u(id text, revoked_at timestamptz)
    WHERE t.id = u.id AND t.revoked_at IS NULL
    RETURNING 1
)
"""
WRITE_BATCH = _WRITE_COMMON + "\nSELECT alluse_batch_guard(0, 0, (SELECT count(*) FROM changed), $7, 0, 0, 0, 0)"
WRITE_BATCH_RARE = _WRITE_COMMON + _WRITE_RARE + """
SELECT alluse_batch_guard(0, 0, (SELECT count(*) FROM changed), $7, (SELECT count(*) FROM merged_portfolios), $14,
                          (SELECT count(*) FROM revoked_tokens), $15)"""

# The writer's session (`Store.connect`).
WRITER_SETTINGS = {"timezone": "UTC", "enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off"}

SELECT_AUDIT_HEAD = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
# The writer numbers events itself, in commit order (it is the only writer).
SELECT_EVENT_HEAD = "SELECT COALESCE(max(seq), 0) FROM events"
AUDIT_COLUMNS = ("seq, at, token_id, role, owner_scope, action, target, request_id, client, outcome, details, "
                 "prev_hash, hash")
SELECT_AUDIT_PAGE = f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
TOKEN_COLUMNS = "id, name, role, owner, secret_hash, created_by, created_at, revoked_at"

# Failures of the connection or the server: the outcome of a write in flight is unknown.
CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                     asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
                     OSError, asyncio.TimeoutError, ConnectionError)


class StatementRejected(Exception):
    """PostgreSQL refused a statement (a constraint, a value it cannot store, the batch's
    version guard): it did not commit. Only the writer sees this."""


class KeyConflict(StatementRejected):
    """A batch held an idempotency key that had committed before (the unique index said
    so): nothing of the batch committed."""


KEY_CONFLICT_SQLSTATE = "AL001"
# The key table's unique index, which the insert of a batch's keys meets.
KEY_INDEX = "idempotency_keys_pkey"


async def set_risk_flag(connection: asyncpg.Connection, account_id: str, portfolio_id: str | None, *,
                        seq: int, active: bool, drawdown: float, limit: float, at: datetime) -> None:
    """Sets or clears the account's drawdown_breach flag and writes its event, numbered
    `seq` (the writer numbers every event, in commit order), in one transaction, on the
    writer's connection (between batches)."""
    # `drawdown_limit` and `flags` as the analytics' `risk` names them (`limit` stays).
    payload = msgspec.json.encode({"account_id": account_id, "drawdown": drawdown, "limit": limit,
                                   "drawdown_limit": limit, "flags": ["drawdown_breach"] if active else []}).decode()
    async with translated_errors(), connection.transaction():
        if active:
            await connection.execute("INSERT INTO risk_flags (account_id, flag, since, drawdown) "
                                     "VALUES ($1, 'drawdown_breach', $2, $3)", account_id, at, drawdown)
        else:
            await connection.execute("DELETE FROM risk_flags WHERE account_id = $1 AND flag = 'drawdown_breach'",
                                     account_id)
        await connection.execute("INSERT INTO events (seq, type, account_id, portfolio_id, payload, created_at) "
                                 "VALUES ($6, $1, $2, $3, $4::json, $5)",
                                 "account.drawdown_breach" if active else "account.drawdown_recovered",
                                 account_id, portfolio_id, payload, at, seq)


async def write_batch(connection: asyncpg.Connection, batch: "BatchWrite") -> None:
    """Writes one batch (`persistence.batch.BatchWrite`) in one statement on the writer's
    connection: one round trip and one implicit transaction. Raises `KeyConflict`,
    `StatementRejected` (nothing committed) or `DatabaseUnavailable` (outcome unknown)."""
    async with translated_errors(rejections=True):
        await connection.fetchval(WRITE_BATCH if batch.rare is None else WRITE_BATCH_RARE, *batch.args())


def account_from_row(row) -> Account:
    return Account(
        id=row["id"], name=row["name"], type=row["type"], status=row["status"], owner=row["owner"],
        portfolio_id=row["portfolio_id"], root_portfolio_id=row["root_portfolio_id"],
        portfolio_depth=row["portfolio_depth"], balance=row["balance"], baseline=row["baseline"],
        allocations=Allocations(contracts=row["allocation_contracts"], leaps=row["allocation_leaps"]),
        trade_income_cents=row["trade_income_cents"], last_reinvested_quarter=row["last_reinvested_quarter"],
        version=row["version"], opened_on=row["opened_on"], latest_effective_date=row["latest_effective_date"],
        created_at=row["created_at"], updated_at=row["updated_at"])


def portfolio_from_row(row) -> Portfolio:
    return Portfolio(**{key: row[key] for key in PORTFOLIO_FIELDS})


PORTFOLIO_FIELDS = tuple(name.strip() for name in PORTFOLIO_COLUMNS.split(","))


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One outbox record, as the feed and subscribers see it."""

    seq: int
    type: str
    account_id: str | None = None
    portfolio_id: str | None = None
    correlation_id: str | None = None
    payload: msgspec.Raw
    created_at: datetime


def event_from_row(row, payload: bytes | None = None) -> StoredEvent:
    """`payload` is the event's derived payload, when it has no stored one."""
    stored = row["payload"]
    return StoredEvent(seq=row["seq"], type=row["type"], account_id=row["account_id"],
                       portfolio_id=row["portfolio_id"], correlation_id=row["correlation_id"],
                       payload=msgspec.Raw(stored.encode() if stored is not None else payload),
                       created_at=row["created_at"])


async def derived_payloads(connection, refs: list) -> list[bytes]:
    """The payloads of derived events (`engine.ledger.OutboxRow`), rebuilt from their
    entries to the bytes the engine replied with: `refs` are rows with the event's `type`,
    `account_id`, `correlation_id` and `entry_sequence`; the answer is in their order.
    Two reads at most, however many events: one for transfers, one for single entries.
    The entries committed with their event, so any snapshot that sees it sees them."""
    transfers = [ref["correlation_id"] for ref in refs if ref["type"] == "transfer.posted"]
    singles = [ref for ref in refs if ref["type"] != "transfer.posted"]
    legs: dict[str, list[Transaction]] = {}
    entries: dict[tuple[str, int], Transaction] = {}
    if transfers:
        for row in await connection.fetch(SELECT_ENTRIES_OF_TRANSFERS, transfers):
            legs.setdefault(row["correlation_id"], []).append(transaction_from_row(row))
    if singles:
        for row in await connection.fetch(SELECT_ENTRIES_AT, [ref["account_id"] for ref in singles],
                                          [ref["entry_sequence"] for ref in singles]):
            entries[(row["account_id"], row["sequence"])] = transaction_from_row(row)
    payloads = []
    for ref in refs:
        if ref["type"] == "transfer.posted":
            payload = transfer_of(legs.get(ref["correlation_id"], []))
        elif ref["type"] == "transaction.posted":
            payload = entries.get((ref["account_id"], ref["entry_sequence"]))
        else:
            payload = None
        if payload is None:   # the CHECK of migration 0009 and the shared commit rule this out
            raise RuntimeError(f"the entries of a {ref['type']} event ({ref['correlation_id'] or ref['account_id']}) "
                               "are missing")
        payloads.append(encode_json(payload))
    return payloads


async def events_with_payloads(connection, rows) -> list[StoredEvent]:
    """Event rows as the feed shows them, derived payloads rebuilt."""
    derived = [row for row in rows if row["payload"] is None]
    if not derived:
        return [event_from_row(row) for row in rows]
    rebuilt = dict(zip((row["seq"] for row in derived), await derived_payloads(connection, derived)))
    return [event_from_row(row, rebuilt.get(row["seq"])) for row in rows]


async def key_answers(connection, keys: list[str]) -> dict[str, tuple[str, bytes]]:
    """The committed idempotency keys among `keys`: each one's fingerprint and answer (the
    exact bytes of the first reply)."""
    rows = await connection.fetch(SELECT_IDEMPOTENCY_MANY, keys)
    derived = [row for row in rows if row["response"] is None]
    rebuilt = dict(zip((row["key"] for row in derived), await derived_payloads(connection, derived))) if derived else {}
    return {row["key"]: (row["fingerprint"], bytes(row["response"]) if row["response"] is not None
                         else rebuilt[row["key"]]) for row in rows}


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
            if getattr(error, "sqlstate", None) == KEY_CONFLICT_SQLSTATE or (
                    isinstance(error, asyncpg.UniqueViolationError) and error.constraint_name == KEY_INDEX):
                raise KeyConflict(str(error)) from error
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
        self.ledger_weeks = LedgerWeeks()

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
            # UTC: the batch's timestamps travel as JSON text, and a naive one means UTC
            # (as the driver's binary encoding treats it). Key lookups only: every statement
            # of this connection finds its rows by key, and the batch's account update (a
            # join of the batch's document with `accounts`), planned once while the table
            # was small as a hash join over a scan of all of it, went on scanning the
            # whole table on every batch as it grew (15 ms a batch at 60,000 accounts),
            # until the next ANALYZE. Nested loops over the primary key cost the same at
            # any size.
            connection = await asyncpg.connect(self.url, command_timeout=self.command_timeout_s,
                                               server_settings=WRITER_SETTINGS)
            # New WAL segments this session opens are not zero-filled first (as the
            # embedded server is configured, `persistence/embedded.py`): where the role may
            # set it (a superuser, or PostgreSQL 15's GRANT SET ON PARAMETER); otherwise
            # the server's own setting stands (docs/operations.md recommends it).
            try:
                await connection.execute("SET wal_init_zero = off")
            except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedObjectError):
                pass  # not allowed, or a server before PostgreSQL 12
            return connection

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

    async def recent_keys(self, limit: int) -> list[str]:
        """The `limit` idempotency keys committed last, oldest first."""
        async with translated_errors():
            rows = await self.pool.fetch("SELECT key FROM (SELECT key, created_at FROM idempotency_keys "
                                         "ORDER BY created_at DESC LIMIT $1) k ORDER BY created_at", limit)
        return [row["key"] for row in rows]

    async def idempotent_response(self, key: str) -> tuple[str, bytes] | None:
        async with translated_errors(), self.pool.acquire() as connection:
            return (await key_answers(connection, [key])).get(key)

    async def load_portfolio(self, portfolio_id: str) -> Portfolio | None:
        async with translated_errors():
            row = await self.pool.fetchrow(SELECT_PORTFOLIO, portfolio_id)
        return portfolio_from_row(row) if row else None

    async def load_accounts(self, account_ids: list[str]) -> dict[str, Account]:
        async with translated_errors():
            rows = await self.pool.fetch(SELECT_ACCOUNTS_BY_ID, account_ids)
        return {row["id"]: account_from_row(row) for row in rows}

    async def portfolio_tree(self, portfolio_id: str, *, depth_max: int, nodes_max: int) -> list[Portfolio]:
        """The portfolio and every unit below it, breadth first, level by level (a loop
        with a depth limit, no recursion), at most `nodes_max` portfolios."""
        root = await self.load_portfolio(portfolio_id)
        if root is None:
            return []
        found, level = [root], [root.id]
        async with translated_errors():
            for _ in range(depth_max):
                if not level or len(found) >= nodes_max:
                    break
                rows = await self.pool.fetch(SELECT_CHILD_PORTFOLIOS, level)
                children = [portfolio_from_row(r) for r in rows][:nodes_max - len(found)]
                found.extend(children)
                level = [c.id for c in children]
        return found

    async def events_after(self, seq: int, limit: int, owner: str | None = None) -> list[StoredEvent]:
        async with translated_errors():
            if owner is None:
                rows = await self.pool.fetch(SELECT_EVENTS_AFTER, seq, limit)
            else:
                rows = await self.pool.fetch(SELECT_OWNER_EVENTS_AFTER, seq, limit, owner)
            return await events_with_payloads(self.pool, rows)

    async def event_seqs_after(self, seq: int, limit: int) -> list[int]:
        """The numbers of the committed events after `seq`, in order: what the feed's
        page would hold, without building its payloads (the webhooks' horizon needs
        only the numbers)."""
        async with translated_errors():
            rows = await self.pool.fetch(SELECT_EVENT_SEQS_AFTER, seq, limit)
        return [row["seq"] for row in rows]

    async def analytics_weeks(self, account_ids: list[str]) -> dict[str, list]:
        """Each account's ledger summed per ISO week of effective date (Monday-based, like
        `engine.analytics.week_of`), as `engine.analytics.WeekTotals` in week order: a few
        hundred rows instead of every entry, kept in memory and brought up to date with
        the entries committed since the last read (`persistence.ledger_weeks`)."""
        async with translated_errors():
            found = await self.ledger_weeks.read(self.pool, account_ids)
        return {account_id: list(found[account_id].totals(account_id)) if account_id in found else []
                for account_id in account_ids}

    async def growth_moved(self, account_ids: list[str]) -> tuple[int, int]:
        """(money forked, money merged) out of these accounts."""
        async with translated_errors():
            found = await self.ledger_weeks.read(self.pool, account_ids)
        return sum(a.forked for a in found.values()), sum(a.merged for a in found.values())

    async def risk_flags(self) -> dict[str, float]:
        async with translated_errors():
            rows = await self.pool.fetch("SELECT account_id, drawdown FROM risk_flags WHERE flag = 'drawdown_breach'")
        return {row["account_id"]: row["drawdown"] for row in rows}

    async def fetch(self, sql: str, *args):
        """For tests and tools that check the database directly."""
        async with translated_errors():
            return await self.pool.fetch(sql, *args)

    # -- security ----------------------------------------------------------------------
    async def audit_page(self, *, after: int, limit: int) -> list:
        from engine.audit import AuditRecord

        async with translated_errors():
            rows = await self.pool.fetch(SELECT_AUDIT_PAGE, after, limit)
        return [AuditRecord(**dict(row)) for row in rows]

    async def token(self, token_id: str) -> dict | None:
        """One API token (revoked or not), without its secret: only its hash."""
        async with translated_errors():
            row = await self.pool.fetchrow(f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = $1", token_id)
        return dict(row) if row else None

    async def tokens(self) -> list[dict]:
        """Every API token (revoked ones too), without secrets: only their hashes."""
        async with translated_errors():
            rows = await self.pool.fetch(f"SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id")
        return [dict(row) for row in rows]

    # -- lookups for the API's conveniences (issue 12) ---------------------------------
    async def entries_by_correlation(self, correlation_id: str) -> list[Transaction]:
        """The legs of one transfer, fork or merge (they share its correlation id)."""
        async with translated_errors():
            rows = await self.pool.fetch(SELECT_ENTRIES_BY_CORRELATION, correlation_id)
        return [transaction_from_row(r) for r in rows]

    async def root_portfolios(self, *, limit: int, after_id: str | None = None, owner: str | None = None,
                              cash_buffer_bps: dict[str, int]) -> list[tuple[Portfolio, dict[str, int]]]:
        """Root portfolios in id order, each with its whole tree's balance per account type,
        its deployable sum (each account's balance less its type's buffer, rounded down, as
        `engine.rules.deployable`) and its active units: one query."""
        buffers = [cash_buffer_bps.get(t, 0) for t in ("generation", "revenue", "compounding")]
        async with translated_errors():
            rows = await self.pool.fetch(SELECT_ROOT_PORTFOLIOS, after_id or "", owner, limit, *buffers)
        found = []
        for row in rows:
            sums = {key: row[key] for key in ("generation", "revenue", "compounding", "deployable", "units_active")}
            found.append((portfolio_from_row(row), sums))
        return found


SELECT_ROOT_PORTFOLIOS = f"""
SELECT {", ".join("p." + c.strip() for c in PORTFOLIO_COLUMNS.split(","))},
       coalesce(sum(a.balance) FILTER (WHERE a.type = 'generation'), 0)::bigint AS generation,
       coalesce(sum(a.balance) FILTER (WHERE a.type = 'revenue'), 0)::bigint AS revenue,
       coalesce(sum(a.balance) FILTER (WHERE a.type = 'compounding'), 0)::bigint AS compounding,
       coalesce(sum(a.balance * (10000 - CASE a.type WHEN 'generation' THEN $4::bigint WHEN 'revenue' THEN $5::bigint
                                      ELSE $6::bigint END) / 10000), 0)::bigint AS deployable,
       (SELECT count(*) FROM portfolios u WHERE u.root_id = p.id AND u.parent_id IS NOT NULL
                                            AND u.status = 'active')::bigint AS units_active
FROM (SELECT * FROM portfolios WHERE parent_id IS NULL AND id > $1 AND ($2::text IS NULL OR owner = $2)
      ORDER BY id LIMIT $3) p
LEFT JOIN accounts a ON a.root_portfolio_id = p.id
GROUP BY {", ".join("p." + c.strip() for c in PORTFOLIO_COLUMNS.split(","))}
ORDER BY p.id"""
