"""`alluse doctor` (the installed console script) on a healthy setup — every check passes
or warns, exit 0 — and on deliberately misconfigured ones: no migrations, asynchronous
commits, a short bootstrap token, a tampered audit log. Each such fail is named, and the
exit code is non-zero with one error line."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg

from actors.api import Engine
from tests.conftest import engine_settings
from tests.ops_helpers import alluse, alluse_json, clean_env, database_name

GOOD_TOKEN = "doctor-admin-token-0123456789abcdef0123456789"


def documented() -> dict[str, dict[str, str]]:
    """docs/operations.md's doctor table: for each check, what it passes, warns and
    fails on ("—": never)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    table = text[text.index("| check | pass | warn | fail |"):].split("\n\n", 1)[0].splitlines()[2:]
    rows = {}
    for line in table:
        names, *cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        for name in names.split(", "):
            rows[name] = dict(zip(("pass", "warn", "fail"), cells))
    return rows


def assert_documented(checks: dict[str, dict]) -> None:
    """Every check the command printed, with a status the table says it can have."""
    table = documented()
    for name, check in checks.items():
        assert name in table, f"check {name!r} is not in docs/operations.md"
        assert table[name][check["status"]] != "—", f"docs/operations.md says {name!r} never {check['status']}s"


def doctor(env: dict) -> tuple[int, dict[str, dict], str]:
    result = alluse("--json", "doctor", env=env)
    checks = {check["name"]: check for check in json.loads(result.stdout)}
    return result.returncode, checks, result.stderr


async def prepare(database_url: str) -> None:
    """A database the engine has used: migrated, one token, some audited changes."""
    async with Engine(engine_settings(database_url)) as engine:
        account = await engine.create_account(name="A", type="revenue", owner="doc")
        await engine.deposit(account.id, 10_000)
        await engine.security.create_token(name="ops lead", role="admin")


async def test_doctor_passes_a_healthy_setup(database_url, tmp_path):
    await prepare(database_url)
    env = clean_env(DATABASE_URL=database_url, ALLUSE_ADMIN_TOKEN=GOOD_TOKEN, ALLUSE_DATA_DIR=str(tmp_path / "data"),
                    ALLUSE_BACKUP_DIR=str(tmp_path / "backups"))
    backup = await asyncio.to_thread(alluse_json, "backup", env=env)
    assert backup["directory"].startswith(str(tmp_path / "backups"))

    code, checks, stderr = await asyncio.to_thread(doctor, env)
    assert code == 0, (checks, stderr)
    assert [c for c in checks.values() if c["status"] == "fail"] == []
    for name in ("database", "migrations", "synchronous_commit", "fsync", "full_page_writes", "audit chain",
                 "alert rules", "last backup", "admin token", "tokens", "clock"):
        assert checks[name]["status"] == "pass", checks[name]
    assert "PostgreSQL 18" in checks["database"]["reason"]
    assert "admin 1" in checks["tokens"]["reason"]
    assert checks["https"]["status"] == "warn" and checks["wal archiving"]["status"] == "warn"
    assert_documented(checks)
    table = await asyncio.to_thread(alluse, "doctor", env=env)
    assert table.returncode == 0 and "synchronous_commit" in table.stdout and "pass" in table.stdout


async def test_doctor_fails_a_misconfigured_setup_and_says_why(database_url, postgres_admin_url, tmp_path):
    await prepare(database_url)
    name = database_name(database_url)
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await admin.close()
    tamper = await asyncpg.connect(database_url)
    try:
        # A superuser can switch the append-only trigger off; the chain still tells.
        await tamper.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update")
        await tamper.execute("UPDATE audit_log SET target = 'someone-else' WHERE seq = 2")
    finally:
        await tamper.close()
    env = clean_env(DATABASE_URL=database_url, ALLUSE_ADMIN_TOKEN="short", ALLUSE_DATA_DIR=str(tmp_path / "data"))

    code, checks, stderr = await asyncio.to_thread(doctor, env)
    assert code == 1
    failed = {name for name, check in checks.items() if check["status"] == "fail"}
    assert failed == {"synchronous_commit", "admin token", "audit chain"}, checks
    assert "acknowledged changes can be lost" in checks["synchronous_commit"]["reason"]
    assert "5 characters" in checks["admin token"]["reason"]
    assert "record 2" in checks["audit chain"]["reason"]
    assert_documented(checks)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == ("alluse: error: doctor: 3 check(s) failed: synchronous_commit, "
                                            "audit chain, admin token"), lines


async def test_doctor_fails_a_database_the_engine_never_migrated(database_url, tmp_path):
    env = clean_env(DATABASE_URL=database_url, ALLUSE_ADMIN_TOKEN=GOOD_TOKEN, ALLUSE_DATA_DIR=str(tmp_path / "d"))
    code, checks, _ = await asyncio.to_thread(doctor, env)
    assert code == 1 and checks["migrations"]["status"] == "fail"
    assert "not applied" in checks["migrations"]["reason"]
    unreachable = clean_env(DATABASE_URL="postgresql://nobody@127.0.0.1:9/none", ALLUSE_ADMIN_TOKEN=GOOD_TOKEN,
                            ALLUSE_DATA_DIR=str(tmp_path / "d"))
    code, checks, _ = await asyncio.to_thread(doctor, unreachable)
    assert code == 1 and checks["database"]["status"] == "fail" and "unreachable" in checks["database"]["reason"]
