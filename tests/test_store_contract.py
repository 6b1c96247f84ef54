"""The persistence contract (issue 10): one suite that every function of
`persistence.store` passes, against the real PostgreSQL.

- Every read of `Store` answers on a freshly migrated, empty schema, and, with the
  database gone, raises `DatabaseUnavailable` and nothing from the driver ("nothing
  above this module sees asyncpg"). A new public method of `Store` fails
  `test_every_store_function_is_in_the_contract` until it is added to `READS`.
- `write_batch` commits a batch whole or not at all: its rows read back through the
  store's own reads; a key committed before is a `KeyConflict`, a tripped version guard
  a `StatementRejected`, and neither leaves a row behind.
- `set_risk_flag` writes the flag and its event together.
"""
from __future__ import annotations

import inspect
from datetime import date, datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import itertools

import msgspec

import asyncpg

import pytest
import pytest_asyncio

from engine import ledger
from engine.errors import DatabaseUnavailable
from engine.model import Account, Transaction
from persistence import store as sql
from persistence.batch import BatchWrite, EventRow, KeyRow, RareRows, account_updates, entry_rows, rare_args
from persistence.store import KeyConflict, StatementRejected, Store

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
TODAY = date(2026, 12, 7)

# Each read of `Store` with arguments that name nothing (an empty schema).
READS: dict[str, tuple[tuple, dict]] = {
    "ping": ((), {}),
    "load_account": (("acc_missing",), {}),
    "list_accounts": ((), {"limit": 10}),
    "get_transaction": (("txn_missing",), {}),
    "list_transactions": (("acc_missing",), {"limit": 10}),
    "recent_keys": ((10,), {}),
    "idempotent_response": (("key-missing",), {}),
    "load_portfolio": (("prt_missing",), {}),
    "load_accounts": ((["acc_missing"],), {}),
    "portfolio_tree": (("prt_missing",), {"depth_max": 3, "nodes_max": 10}),
    "events_after": ((0, 10), {}),
    "event_seqs_after": ((0, 10), {}),
    "analytics_weeks": ((["acc_missing"],), {}),
    "growth_moved": ((["acc_missing"],), {}),
    "risk_flags": ((), {}),
    "audit_page": ((), {"after": 0, "limit": 10}),
    "token": (("tok_missing",), {}),
    "tokens": ((), {}),
    "entries_by_correlation": (("xfr_missing",), {}),
    "root_portfolios": ((), {"limit": 10, "cash_buffer_bps": {}}),
}
# Not reads: the pool's lifecycle, the writer's own connection, and raw SQL for tests.
LIFECYCLE = {"open", "close", "connect", "migrate", "fetch"}


@pytest_asyncio.fixture(loop_scope="session")
async def store(database_url):
    opened = Store(database_url, pool_size=2, command_timeout_s=5.0)
    await opened.open()
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()


def test_every_store_function_is_in_the_contract():
    public = {name for name, member in inspect.getmembers(Store, inspect.iscoroutinefunction)
              if not name.startswith("_")}
    assert public - LIFECYCLE == set(READS), "add the new store function to READS (and so to this contract)"


@pytest.mark.parametrize("name", sorted(READS))
async def test_every_read_answers_on_an_empty_schema(store, name):
    args, kwargs = READS[name]
    result = await getattr(store, name)(*args, **kwargs)
    if isinstance(result, dict):
        # A per-key answer names what was asked for, each with nothing in it.
        result = {key: value for key, value in result.items() if value}
    assert result in (None, [], {}, (0, 0)), f"{name} found something in an empty schema: {result!r}"


@pytest.mark.parametrize("name", sorted(READS))
async def test_every_read_says_database_unavailable_when_the_database_is_gone(store, database_url,
                                                                                postgres_admin_url, name):
    database = database_url.split("?")[0].rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database)
        args, kwargs = READS[name]
        with pytest.raises(DatabaseUnavailable):
            await getattr(store, name)(*args, **kwargs)
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()


# -- write_batch -------------------------------------------------------------------------
def _account(account_id: str, balance: int, version: int) -> Account:
    return Account(id=account_id, name=account_id, type="revenue", owner="contract", balance=balance,
                   version=version, opened_on=TODAY, created_at=NOW, updated_at=NOW)


def _entry(entry_id: str, account_id: str, sequence: int, direction: str, amount: int, after: int) -> Transaction:
    return Transaction(id=entry_id, kind="deposit", account_id=account_id, amount=amount, direction=direction,
                       balance_after=after, effective_date=TODAY, created_at=NOW, correlation_id="dep_1",
                       sequence=sequence)


# The writer numbers events; these batches number theirs from one counter.
EVENT_SEQ = itertools.count(1)


def _batch(*, opened: list[Account] = (), changed: dict[str, Account] | None = None,
           before: dict[str, int] | None = None, entries: list[Transaction] = (), keys: list[KeyRow] = ()) -> BatchWrite:
    rare = RareRows(accounts=list(opened))
    write = BatchWrite(entries=entry_rows(entries),
                       events=[EventRow(next(EVENT_SEQ), "transaction.posted", e.account_id, None, e.correlation_id,
                                        e.created_at, None) for e in entries],
                       payloads=['{"id":"%s"}' % e.id for e in entries],
                       keys=list(keys), rare=rare_args(rare) if rare else None)
    write.updates, write.updates_expected = account_updates(changed or {}, before or {})
    return write


async def _write(store: Store, batch: BatchWrite) -> None:
    connection = await store.connect()
    try:
        await sql.write_batch(connection, batch)
    finally:
        await connection.close()


async def test_a_batch_commits_whole_and_reads_back(store):
    await _write(store, _batch(opened=[_account("acc_a", 0, 0)]))
    deposit = _entry("txn_1", "acc_a", 1, "credit", 500, 500)
    await _write(store, _batch(changed={"acc_a": _account("acc_a", 500, 1)}, before={"acc_a": 0},
                               entries=[deposit], keys=[KeyRow("key-1", "f" * 64, '{"id":"txn_1"}')]))
    assert (await store.load_account("acc_a")).balance == 500
    assert await store.get_transaction("txn_1") == deposit
    assert await store.idempotent_response("key-1") == ("f" * 64, b'{"id":"txn_1"}')
    assert [e.type for e in await store.events_after(0, 10)] == ["transaction.posted"]
    assert await store.recent_keys(10) == ["key-1"]


async def test_a_key_answer_comes_back_byte_for_byte_whatever_its_text_holds(store):
    """A key's own answer travels as a JSON string in the batch's document: escapes,
    quotes, backslashes, non-ASCII and key order come back exactly as encoded."""
    await _write(store, _batch(opened=[_account("acc_k", 0, 0)]))
    answer = r'{"z":1,"memo":"caf\u00e9 \\ \"q\" \u0000 \ud83d\ude00 é 😀","a":[1.50,  2]}'
    deposit = _entry("txn_k", "acc_k", 1, "credit", 5, 5)
    await _write(store, _batch(changed={"acc_k": _account("acc_k", 5, 1)}, before={"acc_k": 0}, entries=[deposit],
                               keys=[KeyRow("key-k", "k" * 64, answer)]))
    assert await store.idempotent_response("key-k") == ("k" * 64, answer.encode())


async def test_a_key_answered_by_its_event_replays_the_event_payload(store):
    """A key whose answer is its event's payload stores the event's number, not a copy
    (migration 0008); a key with neither is refused and nothing of its batch commits."""
    await _write(store, _batch(opened=[_account("acc_e", 0, 0)]))
    deposit = _entry("txn_e", "acc_e", 1, "credit", 70, 70)
    write = _batch(changed={"acc_e": _account("acc_e", 70, 1)}, before={"acc_e": 0}, entries=[deposit])
    seq = write.events[0].seq
    write.keys = [KeyRow("key-e", "e" * 64, None, seq)]
    await _write(store, write)
    assert await store.idempotent_response("key-e") == ("e" * 64, b'{"id":"txn_e"}')
    again = _entry("txn_f", "acc_e", 2, "credit", 5, 75)
    bad = _batch(changed={"acc_e": _account("acc_e", 75, 2)}, before={"acc_e": 1}, entries=[again])
    bad.keys = [KeyRow("key-f", "f" * 64)]
    with pytest.raises(StatementRejected):
        await _write(store, bad)
    assert (await store.load_account("acc_e")).balance == 70
    assert await store.idempotent_response("key-f") is None


async def test_derived_payloads_are_rebuilt_from_their_entries_to_the_bytes_the_engine_encodes(store):
    """An event with no stored payload (migration 0009) reads back, in the feed and as its
    key's answer, as its entries encoded: a single entry named by its account and
    sequence, a transfer by its correlation id (its debit first, whatever order they
    were written in)."""
    await _write(store, _batch(opened=[_account("acc_g", 0, 0), _account("acc_h", 0, 0)]))
    deposit = _entry("txn_g", "acc_g", 1, "credit", 900, 900)
    debit = msgspec.structs.replace(_entry("txn_gd", "acc_g", 2, "debit", 300, 600), kind="transfer",
                                    counterparty_account_id="acc_h", correlation_id="xfr_g", memo="rent")
    credit = msgspec.structs.replace(_entry("txn_hc", "acc_h", 1, "credit", 300, 300), kind="transfer",
                                     counterparty_account_id="acc_g", correlation_id="xfr_g", memo="rent")
    write = _batch(changed={"acc_g": _account("acc_g", 600, 2), "acc_h": _account("acc_h", 300, 1)},
                   before={"acc_g": 0, "acc_h": 0}, entries=[deposit, credit, debit])
    first = next(EVENT_SEQ)
    write.events = [EventRow(first, "transaction.posted", "acc_g", None, None, NOW, 1),
                    EventRow(first + 1, "transfer.posted", "acc_g", None, "xfr_g", NOW, None)]
    write.payloads = [None, None]
    write.keys = [KeyRow("key-g", "g" * 64, None, first), KeyRow("key-x", "x" * 64, None, first + 1)]
    await _write(store, write)
    transfer = ledger.transfer_of([credit, debit])
    assert transfer is not None and transfer.legs == [debit, credit] and transfer.from_account == "acc_g"
    expected = [msgspec.json.encode(deposit), msgspec.json.encode(transfer)]
    assert [bytes(e.payload) for e in await store.events_after(first - 1, 10)] == expected
    assert await store.idempotent_response("key-g") == ("g" * 64, expected[0])
    assert await store.idempotent_response("key-x") == ("x" * 64, expected[1])


async def test_an_event_with_neither_a_payload_nor_its_entries_named_is_refused(store):
    await _write(store, _batch(opened=[_account("acc_i", 0, 0)]))
    deposit = _entry("txn_i", "acc_i", 1, "credit", 10, 10)
    for row in (EventRow(0, "transaction.posted", "acc_i", None, None, NOW, None),
                EventRow(0, "transfer.posted", "acc_i", None, None, NOW, None),
                EventRow(0, "account.opened", "acc_i", None, None, NOW, 1)):
        write = _batch(changed={"acc_i": _account("acc_i", 10, 1)}, before={"acc_i": 0}, entries=[deposit])
        write.events, write.payloads = [msgspec.structs.replace(row, seq=next(EVENT_SEQ))], [None]
        with pytest.raises(StatementRejected):
            await _write(store, write)
    assert (await store.load_account("acc_i")).balance == 0
    assert await store.get_transaction("txn_i") is None


async def test_a_batch_with_a_committed_key_is_a_key_conflict_and_leaves_nothing(store):
    await _write(store, _batch(opened=[_account("acc_b", 0, 0)]))
    first = _entry("txn_2", "acc_b", 1, "credit", 100, 100)
    await _write(store, _batch(changed={"acc_b": _account("acc_b", 100, 1)}, before={"acc_b": 0},
                               entries=[first], keys=[KeyRow("key-2", "a" * 64, "{}")]))
    again = _entry("txn_3", "acc_b", 2, "credit", 100, 200)
    with pytest.raises(KeyConflict):
        await _write(store, _batch(changed={"acc_b": _account("acc_b", 200, 2)}, before={"acc_b": 1},
                                   entries=[again], keys=[KeyRow("key-2", "a" * 64, "{}")]))
    assert (await store.load_account("acc_b")).balance == 100
    assert await store.get_transaction("txn_3") is None
    assert len(await store.events_after(0, 10)) == 1


async def test_a_batch_whose_version_guard_trips_is_rejected_and_leaves_nothing(store):
    await _write(store, _batch(opened=[_account("acc_c", 0, 0)]))
    stale = _entry("txn_4", "acc_c", 1, "credit", 100, 100)
    with pytest.raises(StatementRejected) as rejected:
        await _write(store, _batch(changed={"acc_c": _account("acc_c", 100, 1)}, before={"acc_c": 7},
                                   entries=[stale], keys=[KeyRow("key-4", "b" * 64, "{}")]))
    assert not isinstance(rejected.value, KeyConflict)
    assert (await store.load_account("acc_c")).balance == 0
    assert await store.get_transaction("txn_4") is None
    assert await store.idempotent_response("key-4") is None


async def test_a_risk_flag_and_its_event_are_written_together(store):
    await _write(store, _batch(opened=[_account("acc_d", 0, 0)]))
    connection = await store.connect()
    try:
        await sql.set_risk_flag(connection, "acc_d", None, seq=1, active=True, drawdown=0.2, limit=0.1, at=NOW)
        assert await store.risk_flags() == {"acc_d": 0.2}
        await sql.set_risk_flag(connection, "acc_d", None, seq=2, active=False, drawdown=0.05, limit=0.1, at=NOW)
    finally:
        await connection.close()
    assert await store.risk_flags() == {}
    assert [(e.seq, e.type) for e in await store.events_after(0, 10)] == [(1, "account.drawdown_breach"),
                                                                          (2, "account.drawdown_recovered")]


async def test_the_embedded_server_does_not_zero_fill_new_wal_segments(store):
    """The engine's settings for the server it runs (`persistence/embedded.py`) apply to a
    brand-new data directory at once (a reload), not from its second start."""
    rows = await store.fetch("SHOW wal_init_zero")
    assert rows[0]["wal_init_zero"] == "off"


async def test_the_writer_session_looks_rows_up_by_key_whatever_its_role_may_set(store, database_url):
    """The writer's connection plans nested loops over keys (no scans, no hash or merge
    joins) and asks for WAL segments without zero-fill; a role that may not set the
    latter still connects, with the server's own setting."""
    writer = await store.connect()
    try:
        settings = {name: await writer.fetchval(f"SHOW {name}")
                    for name in ("enable_seqscan", "enable_hashjoin", "enable_mergejoin", "wal_init_zero")}
        assert settings == {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off",
                            "wal_init_zero": "off"}
        await writer.execute("DROP ROLE IF EXISTS contract_plain; CREATE ROLE contract_plain LOGIN")
    finally:
        await writer.close()
    parts = urlsplit(database_url)
    plain = Store(urlunsplit(parts._replace(netloc="contract_plain@" + parts.netloc.rsplit("@", 1)[-1])),
                  pool_size=1, command_timeout_s=5.0)
    connection = await plain.connect()
    try:
        assert await connection.fetchval("SELECT current_user") == "contract_plain"
        assert await connection.fetchval("SHOW enable_hashjoin") == "off"
    finally:
        await connection.close()
