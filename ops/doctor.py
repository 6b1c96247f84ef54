"""`alluse doctor`: the production-readiness checks, each pass / warn / fail with a
one-line reason, against the database and settings in force. Any fail is a non-zero
exit. Checks only read: nothing here changes the database."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg

from actors.settings import Settings, admin_token_file
from engine.audit import ChainCheck
from persistence import backup
from persistence.embedded import EmbeddedServer
from persistence.store import Store

PASS, WARN, FAIL = "pass", "warn", "fail"
ROOT = Path(__file__).resolve().parent.parent
ALERT_RULES = ROOT / "config" / "prometheus" / "alerts.yml"
BACKUP_AGE_WARN_H = 26.0
DISK_FREE_FAIL_BYTES = 1 << 30
DISK_FREE_WARN_FRACTION = 0.10
CLOCK_SKEW_WARN_S = 1.0
CLOCK_SKEW_FAIL_S = 60.0
ADMIN_TOKEN_CHARS_MIN = 32
AUDIT_PAGE = 5000
DURABLE_COMMIT = ("on", "remote_apply", "remote_write", "local")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    reason: str


def _admin_token(settings: Settings) -> str:
    if settings.server.admin_token:
        return settings.server.admin_token
    path = admin_token_file(settings.database.data_dir)
    return path.read_text().strip() if path.exists() else ""


def check_settings(settings: Settings) -> list[Check]:
    """What the settings alone say."""
    checks = []
    server = settings.server
    if server.tls_cert_file and server.tls_key_file:
        checks.append(Check("https", PASS, f"serving TLS with {server.tls_cert_file}"))
    else:
        checks.append(Check("https", WARN, "plain HTTP: terminate TLS in front of it (deploy/nginx/alluse.conf)"))
    url = settings.database.url
    if url:
        parts = urlsplit(url)
        mode = (parse_qs(parts.query).get("sslmode") or ["(none)"])[-1]
        local = (parts.hostname or "") in ("", "localhost", "127.0.0.1", "::1")
        status = PASS if mode == "verify-full" else (WARN if local else FAIL)
        checks.append(Check("database tls", status, f"DATABASE_URL sslmode={mode}"
                            + ("" if status == PASS else "; use sslmode=verify-full with sslrootcert")))
    else:
        checks.append(Check("database tls", PASS, "embedded server on a local Unix socket (no network)"))
    token = _admin_token(settings)
    if not token:
        checks.append(Check("admin token", WARN, "none yet: it is generated at first start"))
    elif len(token) < ADMIN_TOKEN_CHARS_MIN:
        checks.append(Check("admin token", FAIL, f"the bootstrap admin token has {len(token)} characters; "
                            f"use at least {ADMIN_TOKEN_CHARS_MIN} random ones"))
    checks.append(_alert_rules())
    checks.append(_disk(settings.database.data_dir))
    checks.append(_last_backup(settings.database.backup_dir))
    return checks


def _alert_rules() -> Check:
    if not ALERT_RULES.exists():
        return Check("alert rules", FAIL, f"{ALERT_RULES.relative_to(ROOT)} is missing")
    promtool = shutil.which("promtool")
    if promtool is None:
        return Check("alert rules", WARN, "present, but promtool is not installed to check them")
    result = subprocess.run([promtool, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        return Check("alert rules", FAIL, f"promtool check rules: {lines[-1] if lines else 'failed'}")
    return Check("alert rules", PASS, "config/prometheus/alerts.yml passes promtool check rules")


def _disk(data_dir: str) -> Check:
    probe = Path(data_dir).expanduser().resolve()
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_gib, fraction = usage.free / (1 << 30), usage.free / usage.total
    reason = f"{free_gib:.1f} GiB free ({fraction:.0%}) at {probe}"
    if usage.free < DISK_FREE_FAIL_BYTES:
        return Check("disk space", FAIL, reason)
    return Check("disk space", WARN if fraction < DISK_FREE_WARN_FRACTION else PASS, reason)


def _last_backup(backup_dir: str) -> Check:
    if not backup_dir:
        return Check("last backup", WARN, "no database.backup_dir (ALLUSE_BACKUP_DIR) to look in")
    newest = backup.newest_backup(backup_dir)
    if newest is None:
        return Check("last backup", WARN, f"no backup in {backup_dir}: run `alluse backup`")
    path, manifest = newest
    age_h = (datetime.now(timezone.utc) - datetime.fromisoformat(manifest["finished_at"])).total_seconds() / 3600
    status = WARN if age_h > BACKUP_AGE_WARN_H else PASS
    return Check("last backup", status, f"{manifest['kind']} {path.name}, {age_h:.1f} h old")


async def check_database(url: str, settings: Settings) -> list[Check]:
    try:
        connection = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as error:
        return [Check("database", FAIL, f"unreachable: {error}")]
    try:
        version = await connection.fetchval("SHOW server_version")
        checks = [Check("database", PASS, f"reachable, PostgreSQL {version}")]
        checks.append(await _migrations(connection))
        checks += await _durability(connection)
        checks.append(await _archiving(connection))
        checks.append(await _clock(connection))
        if checks[1].status == PASS:
            checks += await _tokens(connection, settings)
    finally:
        await connection.close()
    if checks[1].status == PASS:
        checks.append(await _audit_chain(url))
    return checks


async def _migrations(connection) -> Check:
    wanted = sorted(f.name for f in resources.files("persistence.migrations").iterdir() if f.name.endswith(".sql"))
    try:
        applied = {r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        applied = set()
    missing = [name for name in wanted if name not in applied]
    if missing:
        return Check("migrations", FAIL, f"{len(missing)} not applied ({', '.join(missing)}): start the engine once")
    return Check("migrations", PASS, f"all {len(wanted)} applied")


async def _durability(connection) -> list[Check]:
    checks = []
    commit = await connection.fetchval("SHOW synchronous_commit")
    checks.append(Check("synchronous_commit", PASS if commit in DURABLE_COMMIT else FAIL,
                        f"{commit}" + ("" if commit in DURABLE_COMMIT else ": acknowledged changes can be lost")))
    for name in ("fsync", "full_page_writes"):
        value = await connection.fetchval(f"SHOW {name}")
        checks.append(Check(name, PASS if value == "on" else FAIL,
                            value + ("" if value == "on" else ": a crash can corrupt the database")))
    return checks


async def _archiving(connection) -> Check:
    mode = await connection.fetchval("SHOW archive_mode")
    if mode == "off":
        return Check("wal archiving", WARN, "off: only base backups, no point-in-time restore "
                     "(set database.wal_archive_dir)")
    stats = await connection.fetchrow("SELECT archived_count, last_archived_time, failed_count, last_failed_time, "
                                      "last_failed_wal FROM pg_stat_archiver")
    failing = stats["last_failed_time"] is not None and (
        stats["last_archived_time"] is None or stats["last_failed_time"] > stats["last_archived_time"])
    if failing:
        return Check("wal archiving", FAIL, f"failing: {stats['last_failed_wal']} could not be archived "
                     f"({stats['failed_count']} failures)")
    return Check("wal archiving", PASS, f"{mode}, {stats['archived_count']} segments archived")


async def _clock(connection) -> Check:
    before = datetime.now(timezone.utc)
    database_now = await connection.fetchval("SELECT clock_timestamp()")
    after = datetime.now(timezone.utc)
    skew_s = abs((database_now - (before + (after - before) / 2)).total_seconds())
    newest = None
    try:
        newest = await connection.fetchval("SELECT max(at) FROM audit_log")
    except asyncpg.UndefinedTableError:
        pass
    if newest is not None and (newest - after).total_seconds() > CLOCK_SKEW_FAIL_S:
        return Check("clock", FAIL, f"this clock is behind the newest audit record ({newest.isoformat()})")
    reason = f"{skew_s * 1000:.0f} ms from the database's clock"
    if skew_s > CLOCK_SKEW_FAIL_S:
        return Check("clock", FAIL, reason)
    return Check("clock", WARN if skew_s > CLOCK_SKEW_WARN_S else PASS, reason)


async def _tokens(connection, settings: Settings) -> list[Check]:
    rows = await connection.fetch("SELECT role, count(*) AS n FROM api_tokens WHERE revoked_at IS NULL "
                                  "GROUP BY role ORDER BY role")
    counts = {row["role"]: row["n"] for row in rows}
    summary = ", ".join(f"{role} {counts.get(role, 0)}" for role in ("admin", "operator", "strategy", "viewer"))
    checks = [Check("tokens", PASS, f"active by role: {summary}")]
    token = _admin_token(settings)
    if token and len(token) >= ADMIN_TOKEN_CHARS_MIN:
        if counts.get("admin", 0):
            checks.append(Check("admin token", PASS, "named admin tokens exist; keep the bootstrap one locked away"))
        else:
            checks.append(Check("admin token", WARN, "only the bootstrap admin token: give people named tokens "
                                "(`alluse tokens create`)"))
    return checks


async def _audit_chain(url: str) -> Check:
    store = Store(url, pool_size=1)
    await store.open()
    try:
        check, after = ChainCheck(), 0
        while True:
            page = await store.audit_page(after=after, limit=AUDIT_PAGE)
            for record in page:
                check.feed(record)
            if len(page) < AUDIT_PAGE:
                break
            after = page[-1].seq
    finally:
        await store.close()
    if check.valid:
        return Check("audit chain", PASS, f"{check.records} records, hash chain intact")
    return Check("audit chain", FAIL, f"broken at record {check.first_bad_record}: {check.reason}")


def run_checks(settings: Settings) -> list[Check]:
    checks = check_settings(settings)
    url = settings.database.url
    server = None
    if not url:
        if not (Path(settings.database.data_dir).expanduser() / "pg" / "PG_VERSION").exists():
            return [Check("database", FAIL, f"no embedded database in {settings.database.data_dir} yet")] + checks
        server = EmbeddedServer(settings.database.data_dir)
        url = server.start()
    try:
        return asyncio.run(check_database(url, settings)) + checks
    finally:
        if server is not None:
            server.stop()


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(check) for check in checks]

