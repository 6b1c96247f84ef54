"""The audit log against the real database: every committed change carries a record in
its own commit, the records form a hash chain, and tampering with one row directly in
PostgreSQL makes verification name the first bad record."""
from __future__ import annotations

import asyncpg
import pytest

from actors.context import AUDIT_CONTEXT
from engine.audit import AuditContext, Principal

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _audit_rows(engine):
    return await engine.store.fetch("SELECT * FROM audit_log ORDER BY seq")


async def test_every_committed_change_has_one_record_in_a_valid_chain(engine):
    account = await engine.create_account(name="Rev", type="revenue", owner="ann")
    for index in range(5):
        await engine.deposit(account.id, 100 + index)
    other = await engine.create_account(name="Gen", type="generation", owner="ann")
    await engine.transfer(account.id, other.id, 50)
    rows = await _audit_rows(engine)
    assert [row["action"] for row in rows] == ["create_account"] + ["deposit"] * 5 + ["create_account", "transfer"]
    assert [row["seq"] for row in rows] == list(range(1, 9))
    assert all(row["token_id"] == "embedded" and row["outcome"] == "committed" for row in rows)
    assert rows[-1]["target"] == account.id
    verdict = await engine.security.verify_audit()
    assert (verdict.valid, verdict.records, verdict.first_bad_record) == (True, 8, None)


async def test_a_request_context_names_the_principal_and_request(engine):
    principal = Principal(token_id="tok_x", role="operator", owner="ann")
    context = AuditContext(principal, request_id="req-1", client="127.0.0.1", route="POST /v1/accounts")
    reset = AUDIT_CONTEXT.set(context)
    try:
        await engine.create_account(name="Rev", type="revenue", owner="ann")
    finally:
        AUDIT_CONTEXT.reset(reset)
    assert context.recorded
    (row,) = await _audit_rows(engine)
    assert (row["token_id"], row["role"], row["owner_scope"], row["request_id"], row["client"]) == \
        ("tok_x", "operator", "ann", "req-1", "127.0.0.1")


async def test_a_refused_operation_commits_no_record_of_a_change(engine):
    account = await engine.create_account(name="Com", type="compounding", owner="ann")
    with pytest.raises(Exception):
        await engine.withdraw(account.id, 10)
    assert [row["action"] for row in await _audit_rows(engine)] == ["create_account"]


async def test_an_admin_override_is_audited_with_its_reason(engine):
    account = await engine.create_account(name="Com", type="compounding", owner="ann")
    await engine.deposit(account.id, 1000)
    result = await engine.withdraw(account.id, 400, override_reason="court order 17")
    assert result.balance_after == 600
    row = (await _audit_rows(engine))[-1]
    assert row["action"] == "withdraw" and '"reason":"court order 17"' in row["details"]


async def test_the_log_is_append_only_for_ordinary_statements(engine, database_url):
    await engine.create_account(name="Rev", type="revenue", owner="ann")
    connection = await asyncpg.connect(database_url)
    try:
        for statement in ("UPDATE audit_log SET outcome = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await connection.execute(statement)
    finally:
        await connection.close()
    assert (await engine.security.verify_audit()).records == 1


@pytest.mark.parametrize("tamper, bad", [
    ("UPDATE audit_log SET target = 'someone-else' WHERE seq = 3", 3),
    ("UPDATE audit_log SET details = '{}' WHERE seq = 2", 2),
    ("DELETE FROM audit_log WHERE seq = 4", 5),
    ("UPDATE audit_log SET hash = repeat('a', 64) WHERE seq = 5", 5),
])
async def test_tampering_with_one_row_in_postgresql_names_the_first_bad_record(engine, database_url, tamper, bad):
    account = await engine.create_account(name="Rev", type="revenue", owner="ann")
    for _ in range(5):
        await engine.deposit(account.id, 100)
    assert (await engine.security.verify_audit()).valid
    connection = await asyncpg.connect(database_url)
    try:
        # A superuser can switch the append-only trigger off; the chain still tells.
        await connection.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update")
        await connection.execute(tamper)
    finally:
        await connection.close()
    verdict = await engine.security.verify_audit()
    assert not verdict.valid
    assert verdict.first_bad_record == bad


async def test_the_chain_continues_across_a_restart(database_url):
    from actors.api import Engine
    from tests.conftest import engine_settings

    for _ in range(2):
        async with Engine(engine_settings(database_url)) as engine:
            account = await engine.create_account(name="Rev", type="revenue", owner="ann")
            await engine.deposit(account.id, 100)
    async with Engine(engine_settings(database_url)) as engine:
        verdict = await engine.security.verify_audit()
    assert (verdict.valid, verdict.records) == (True, 4)
