"""Backups that are known to restore: load runs, `alluse backup` copies the live embedded
server (WAL archiving on), more load runs, and `alluse restore` makes fresh data
directories — at the backup, at a chosen time, at the end of the archive. The engine
started on each has exactly the balances of that moment, conserved money, an audit chain
that verifies with the manifest's head, and idempotency keys that still replay. A
corrupted or truncated backup is refused. The same for a `DATABASE_URL` server (pg_dump).
All with the installed `alluse` console script and the real PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import asyncpg
import pytest

from actors.api import Engine
from actors.settings import load_settings
from tests.conftest import eventually
from tests.ops_helpers import alluse, alluse_json, clean_env, create_database, drop_database

ACCOUNTS = 6
DEPOSIT_CENTS = 1_000_000


@pytest.fixture
def place():
    """A short temporary directory (the embedded server's socket lives in its data
    directory, and socket paths are limited in length)."""
    path = Path(tempfile.mkdtemp(prefix="alluse-br-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settings_for(data_dir: Path, archive: Path | None = None, url: str = ""):
    return load_settings({}, {"database": {"data_dir": str(data_dir), "url": url,
                                           "wal_archive_dir": str(archive) if archive else ""}})


async def load(engine: Engine, accounts: list[str], phase: str, operations: int) -> list[tuple[str, str, int, str]]:
    """Concurrent deposits and transfers, each with its own idempotency key; returns
    (key, account, amount, transaction id) of the deposits."""
    rng = random.Random(phase)
    deposits = []

    async def one(index: int):
        key = f"{phase}-{index}"
        if index % 3 == 0:
            account, amount = rng.choice(accounts), rng.randint(1, 5_000)
            entry = await engine.deposit(account, amount, idempotency_key=key)
            deposits.append((key, account, amount, entry.id))
        else:
            source, target = rng.sample(accounts, 2)
            await engine.transfer(source, target, rng.randint(1, 2_000), idempotency_key=key)

    await asyncio.gather(*(one(index) for index in range(operations)))
    return deposits


async def books(url: str) -> dict:
    """Balances, the money checks, and the audit head, straight from the database."""
    connection = await asyncpg.connect(url)
    try:
        balances = {r["id"]: r["balance"] for r in await connection.fetch("SELECT id, balance FROM accounts")}
        mismatched = await connection.fetch(
            "SELECT a.id FROM accounts a LEFT JOIN entries e ON e.account_id = a.id GROUP BY a.id, a.balance "
            "HAVING a.balance <> coalesce(sum(CASE e.direction WHEN 'credit' THEN e.amount ELSE -e.amount END), 0)")
        flows = await connection.fetchval(
            "SELECT coalesce(sum(CASE kind WHEN 'deposit' THEN amount WHEN 'withdrawal' THEN -amount ELSE 0 END), 0) "
            "FROM entries")
        head = await connection.fetchrow("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        now = await connection.fetchval("SELECT clock_timestamp()")
        return {"balances": balances, "mismatched": [r["id"] for r in mismatched], "flows": flows,
                "audit_head": {"seq": head["seq"], "hash": head["hash"]}, "time": now}
    finally:
        await connection.close()


async def archive_everything(url: str) -> None:
    """Switches to a new WAL segment and waits until the finished one is archived."""
    connection = await asyncpg.connect(url)
    try:
        segment = await connection.fetchval("SELECT pg_walfile_name(pg_switch_wal())")

        async def archived():
            last = await connection.fetchval("SELECT last_archived_wal FROM pg_stat_archiver")
            return last is not None and last >= segment

        await eventually(archived, "the WAL segment to be archived", timeout_s=30)
    finally:
        await connection.close()


async def check_restored(data_dir: Path, expected: dict, replay: tuple[str, str, int, str]) -> None:
    """Starts the engine on a restored data directory and checks it against `expected`."""
    async with Engine(settings_for(data_dir)) as engine:
        restored = await books(engine.database_url)
        assert restored["balances"] == expected["balances"]
        assert restored["mismatched"] == [], "every balance equals its entries"
        assert sum(restored["balances"].values()) == restored["flows"], "money is conserved"
        assert restored["audit_head"] == expected["audit_head"]
        verification = await engine.security.verify_audit()
        assert verification.valid and verification.records == expected["audit_head"]["seq"]
        key, account, amount, transaction_id = replay
        before = (await engine.get_account(account)).balance
        again = await engine.deposit(account, amount, idempotency_key=key)
        assert again.id == transaction_id and (await engine.get_account(account)).balance == before


async def test_backups_restore_to_the_backup_to_a_chosen_time_and_to_the_end_of_the_archive(place):
    archive = place / "archive"
    env = clean_env(ALLUSE_DATA_DIR=str(place / "live"), ALLUSE_WAL_ARCHIVE_DIR=str(archive))
    async with Engine(settings_for(place / "live", archive)) as engine:
        accounts = [(await engine.create_account(name=f"A{i}", type="revenue", owner="ops")).id
                    for i in range(ACCOUNTS)]
        for account in accounts:
            await engine.deposit(account, DEPOSIT_CENTS)
        first = await load(engine, accounts, "before-backup", 300)
        at_backup = await books(engine.database_url)

        result = await asyncio.to_thread(alluse, "--json", "backup", str(place / "backup"), env=env)
        assert result.returncode == 0, result
        manifest = json.loads((place / "backup" / "alluse-backup.json").read_text())
        assert manifest["kind"] == "basebackup" and manifest["audit_head"] == at_backup["audit_head"]
        assert manifest["audit_seq"] == at_backup["audit_head"]["seq"] and manifest["event_seq"] > 0

        second = await load(engine, accounts, "after-backup", 300)
        at_chosen_time = await books(engine.database_url)
        await load(engine, accounts, "later", 300)
        at_end = await books(engine.database_url)
        await archive_everything(engine.database_url)
    assert at_backup["balances"] != at_chosen_time["balances"] != at_end["balances"]

    restore_env = clean_env(ALLUSE_DATA_DIR=str(place / "at-backup"))
    result = await asyncio.to_thread(alluse, "restore", str(place / "backup"), env=restore_env)
    assert result.returncode == 0, result
    await check_restored(place / "at-backup", at_backup, first[0])

    until = at_chosen_time["time"].isoformat()
    result = await asyncio.to_thread(alluse, "restore", str(place / "backup"), "--until", until,
                                     "--wal-archive", str(archive),
                                     env=clean_env(ALLUSE_DATA_DIR=str(place / "at-time")))
    assert result.returncode == 0, result
    await check_restored(place / "at-time", at_chosen_time, second[-1])

    result = await asyncio.to_thread(alluse, "restore", str(place / "backup"), "--wal-archive", str(archive),
                                     env=clean_env(ALLUSE_DATA_DIR=str(place / "at-end")))
    assert result.returncode == 0, result
    await check_restored(place / "at-end", at_end, second[0])

    # A restore never overwrites a data directory that holds a database.
    again = await asyncio.to_thread(alluse, "restore", str(place / "backup"), env=restore_env)
    assert again.returncode == 1 and "already holds a database" in again.stderr, again


def refused(backup: Path, data_dir: Path) -> str:
    result = alluse("restore", str(backup), env=clean_env(ALLUSE_DATA_DIR=str(data_dir)))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result
    assert not (data_dir / "pg").exists(), "nothing is written from a bad backup"
    return lines[0]


async def test_a_backup_restores_and_starts_while_the_server_it_came_from_still_runs(place):
    """The backup holds the live server's socket lock file (its socket lives in its data
    directory); the restored server must not take it for its own while that server's
    process exists."""
    async with Engine(settings_for(place / "live")) as engine:
        account = await engine.create_account(name="A", type="revenue", owner="ops")
        await engine.deposit(account.id, 7_000)
        result = await asyncio.to_thread(alluse, "backup", str(place / "backup"),
                                         env=clean_env(ALLUSE_DATA_DIR=str(place / "live")))
        assert result.returncode == 0, result
        assert list((place / "backup" / "base").glob(".s.PGSQL.*.lock")), "the source's socket lock came along"
        result = await asyncio.to_thread(alluse, "restore", str(place / "backup"),
                                         env=clean_env(ALLUSE_DATA_DIR=str(place / "copy")))
        assert result.returncode == 0, result
        async with Engine(settings_for(place / "copy")) as copy:
            assert (await copy.get_account(account.id)).balance == 7_000


async def test_a_corrupted_or_truncated_backup_is_refused(place):
    async with Engine(settings_for(place / "live")) as engine:
        account = await engine.create_account(name="A", type="revenue", owner="ops")
        await engine.deposit(account.id, 5_000)
    backup_dir = place / "backup"
    result = await asyncio.to_thread(alluse, "backup", str(backup_dir),
                                     env=clean_env(ALLUSE_DATA_DIR=str(place / "live")))
    assert result.returncode == 0, result
    manifest_path = backup_dir / "alluse-backup.json"
    original = manifest_path.read_text()

    tampered = json.loads(original)
    tampered["audit_seq"] += 1
    manifest_path.write_text(json.dumps(tampered))
    assert "checksum does not match" in refused(backup_dir, place / "r1")
    manifest_path.write_text(original[: len(original) // 2])
    assert "not valid JSON" in refused(backup_dir, place / "r2")
    manifest_path.write_text(original)

    # The largest relation file, cut in half: PostgreSQL's own manifest catches it.
    relation = max((p for p in (backup_dir / "base" / "base").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = relation.read_bytes()
    relation.write_bytes(data[: len(data) // 2])
    assert "pg_verifybackup failed" in refused(backup_dir, place / "r3")
    relation.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert "pg_verifybackup failed" in refused(backup_dir, place / "r4")
    relation.write_bytes(data)

    (backup_dir / "base" / "backup_manifest").unlink()
    assert "incomplete" in refused(backup_dir, place / "r5")
    assert "is not a backup" in refused(place / "nowhere", place / "r6")


def wal_segments(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if re.fullmatch(r"[0-9A-F]{24}", path.name))


async def test_a_wal_segment_of_the_wrong_size_is_refused(place):
    """Past the backup's end, where pg_verifybackup reads no WAL, a short segment would
    pass its check and recovery could take it for the end of the WAL."""
    archive = place / "archive"
    async with Engine(settings_for(place / "live", archive)) as engine:
        account = await engine.create_account(name="A", type="revenue", owner="ops")
        await engine.deposit(account.id, 5_000)
        result = await asyncio.to_thread(alluse, "backup", str(place / "backup"),
                                         env=clean_env(ALLUSE_DATA_DIR=str(place / "live"),
                                                       ALLUSE_WAL_ARCHIVE_DIR=str(archive)))
        assert result.returncode == 0, result
        await engine.deposit(account.id, 1_000)
        await archive_everything(engine.database_url)
    backup = place / "backup"
    for segment, data_dir in ((wal_segments(backup / "base" / "pg_wal")[-1], place / "r1"),
                              (wal_segments(archive)[-1], place / "r2")):
        whole = segment.read_bytes()
        assert len(whole) == 16 * 1024 * 1024
        segment.write_bytes(whole[:1_000_000])
        result = alluse("restore", str(backup), "--wal-archive", str(archive),
                        env=clean_env(ALLUSE_DATA_DIR=str(data_dir)))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result
        assert lines[0] == (f"alluse: error: WAL segment {segment} has 1,000,000 bytes, not the server's "
                            "16,777,216: it is truncated or damaged; restore from another backup or archive"), lines
        assert not (data_dir / "pg").exists(), "nothing is written from a bad backup"
        segment.write_bytes(whole)
    result = alluse("restore", str(backup), "--wal-archive", str(archive),
                    env=clean_env(ALLUSE_DATA_DIR=str(place / "whole")))
    assert result.returncode == 0, result


async def test_a_database_url_server_is_backed_up_with_pg_dump_and_restored_into_an_empty_database(
        database_url, postgres_server_uri, place):
    async with Engine(settings_for(place / "data", url=database_url)) as engine:
        accounts = [(await engine.create_account(name=f"A{i}", type="revenue", owner="ops")).id for i in range(3)]
        for account in accounts:
            await engine.deposit(account, DEPOSIT_CENTS)
        deposits = await load(engine, accounts, "dump", 90)
        expected = await books(database_url)
    manifest = await asyncio.to_thread(alluse_json, "backup", str(place / "dump"),
                                       env=clean_env(DATABASE_URL=database_url))
    assert manifest["kind"] == "pg_dump" and manifest["audit_head"] == expected["audit_head"]

    target = await asyncio.to_thread(create_database, postgres_server_uri)
    try:
        env = clean_env(DATABASE_URL=target, ALLUSE_DATA_DIR=str(place / "data"))
        until = await asyncio.to_thread(alluse, "restore", str(place / "dump"), "--until", "2026-01-01 00:00+00",
                                        env=env)
        assert until.returncode == 2 and "--until" in until.stderr, until
        result = await asyncio.to_thread(alluse, "restore", str(place / "dump"), env=env)
        assert result.returncode == 0, result
        async with Engine(settings_for(place / "data", url=target)) as engine:
            restored = await books(target)
            assert restored["balances"] == expected["balances"] and restored["mismatched"] == []
            assert restored["audit_head"] == expected["audit_head"]
            assert (await engine.security.verify_audit()).valid
            key, account, amount, transaction_id = deposits[0]
            assert (await engine.deposit(account, amount, idempotency_key=key)).id == transaction_id
        again = await asyncio.to_thread(alluse, "restore", str(place / "dump"), env=env)
        assert again.returncode == 1 and "already holds an ALL-USE schema" in again.stderr, again

        dump = place / "dump" / "database.pgdump"
        dump.write_bytes(dump.read_bytes()[:-100])
        cut = await asyncio.to_thread(alluse, "restore", str(place / "dump"), env=env)
        assert cut.returncode == 1 and "does not match the manifest's SHA-256" in cut.stderr, cut
    finally:
        await asyncio.to_thread(drop_database, postgres_server_uri, target)
