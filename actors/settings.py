"""Configuration: `config/default.toml` < the file named by ALLUSE_CONFIG < environment
variables. Typed with msgspec; an unknown key is an error that names it."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import Meta, Struct

from engine import limits
from engine.rules import Rules

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.toml"


class ServerSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    body_max_bytes: Annotated[int, Meta(ge=1024, le=limits.BODY_BYTES_MAX)] = 65536
    admin_token: str = ""
    # HTTPS: both set = serve TLS with this PEM certificate (chain) and private key.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Non-empty: GET /metrics needs `Authorization: Bearer <this>` (Prometheus'
    # `authorization.credentials_file`); empty: /metrics is open to whoever reaches the port.
    metrics_token: str = ""
    # CORS: browser origins (e.g. "https://dash.example.com") allowed to call the API.
    # Empty (the default): no cross-origin access at all.
    cors_origins: Annotated[list[Annotated[str, Meta(min_length=1, max_length=200)]], Meta(max_length=100)] = []
    # The console's sign-in session lifetime.
    console_session_s: Annotated[int, Meta(ge=60, le=7 * 86_400)] = 8 * 3600


class SecuritySettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Per-token token bucket: sustained requests per second and the burst above it.
    rate_limit_per_s: Annotated[float, Meta(gt=0, le=1_000_000)] = 5000.0
    rate_limit_burst: Annotated[int, Meta(ge=1, le=1_000_000)] = 10000
    # Missing or invalid tokens from one client address: past this many in the window,
    # the address gets 429 until the window ends.
    invalid_tokens_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 20
    invalid_tokens_window_s: Annotated[float, Meta(gt=0, le=86_400)] = 60.0
    # A client must send its whole body within this time (slow clients get 408).
    body_read_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0
    # Idle keep-alive connections are closed after this.
    keepalive_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 75.0
    # Header limits (aiohttp answers 400 past them).
    header_line_bytes_max: Annotated[int, Meta(ge=1024, le=65536)] = 8190
    header_field_bytes_max: Annotated[int, Meta(ge=1024, le=65536)] = 8190
    headers_max: Annotated[int, Meta(ge=8, le=1024)] = 64


class DatabaseSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str = ""
    data_dir: str = ".alluse"
    pool_size: Annotated[int, Meta(ge=1, le=64)] = 8
    # Embedded server only: non-empty = archive every WAL segment into this directory,
    # so `alluse restore --until` can recover to a point in time after a base backup.
    wal_archive_dir: str = ""
    # A partly filled WAL segment is archived after at most this long (PostgreSQL's
    # archive_timeout): the most recent changes a point-in-time restore can miss.
    archive_timeout_s: Annotated[int, Meta(ge=1, le=86_400)] = 60
    # Where `alluse backup` puts backups without a directory argument, and where
    # `alluse doctor` looks for the newest one.
    backup_dir: str = ""
    # True: refuse to start unless DATABASE_URL verifies the server's certificate and
    # name (sslmode=verify-full). False: whatever the URL says is used.
    require_verified_tls: bool = False
    # Embedded server only: below this much free space on the data directory's file
    # system writes are refused with 503 storage_full (before PostgreSQL runs out and
    # PANICs); they resume by themselves once there is room again.
    storage_free_min_mb: Annotated[int, Meta(ge=0, le=1 << 20)] = 64


class EngineSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    resident_accounts_max: Annotated[int, Meta(ge=16, le=limits.RESIDENT_ACCOUNTS_MAX)] = 100_000
    passivate_idle_s: Annotated[float, Meta(gt=0)] = 300.0
    operations_in_flight_max: Annotated[int, Meta(ge=1, le=limits.OPERATIONS_IN_FLIGHT_MAX)] = 4096
    account_operations_in_flight_max: Annotated[int, Meta(ge=1, le=limits.OPERATIONS_IN_FLIGHT_MAX)] = 256
    batch_size_max: Annotated[int, Meta(ge=1, le=limits.BATCH_SIZE_MAX)] = 1024
    batch_wait_ms: Annotated[float, Meta(ge=0, le=100)] = 0.0
    write_queue_max: Annotated[int, Meta(ge=1, le=limits.WRITE_QUEUE_MAX)] = 8192
    operation_timeout_s: Annotated[float, Meta(gt=0, le=300)] = 10.0
    # Tests only: lets POST /v1/admin/faults crash an account actor. ALLUSE_FAULT_INJECTION=1.
    fault_injection: bool = False
    # When another engine holds the data directory or the database's writer lock: False
    # exits (code 2); True (ALLUSE_STANDBY=1) waits as a hot standby, not ready, and
    # takes over when the other one stops.
    standby: bool = False
    # Reinvest every portfolio for the quarter that just ended, once it has ended.
    reinvest_schedule: bool = True
    tree_nodes_max: Annotated[int, Meta(ge=1, le=100_000)] = 10_000
    # How long a committed idempotency key answers its retries (then it is purged and a
    # request with it runs anew): 7 days, docs/decisions.md.
    idempotency_key_retention_s: Annotated[float, Meta(ge=1, le=90 * 86_400)] = 7 * 86_400.0
    # The cyclic garbage collector's young-generation threshold while the engine runs
    # (CPython's default is 700): each operation allocates a few dozen short-lived
    # objects, and at 700 the collector runs every few operations and walks the older
    # generations far too often (~30% of the engine's CPU per transfer). Objects alive at
    # start are frozen out of collection. 0 leaves the interpreter's settings alone
    # (docs/decisions.md, "The garbage collector"). ALLUSE_GC_YOUNG_THRESHOLD.
    gc_young_threshold: Annotated[int, Meta(ge=0, le=10_000_000)] = 50_000


class SupervisionSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    restarts_max: Annotated[int, Meta(ge=0, le=1000)] = 5
    window_s: Annotated[float, Meta(gt=0, le=86_400)] = 60.0


class AnalyticsSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Annual risk-free rate for the Sharpe ratio, as a fraction (0.04 = 4%).
    risk_free_rate: Annotated[float, Meta(ge=-1, le=1)] = 0.0
    # Annual required (minimum acceptable) return for the Sortino ratio, as a fraction.
    required_return: Annotated[float, Meta(ge=-1, le=1)] = 0.0


class WebhookSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Run the delivery worker. False keeps endpoints manageable and delivers nothing.
    deliver: bool = True
    # Development and tests only: let private, loopback and link-local targets (and plain
    # http to them) receive webhooks. ALLUSE_WEBHOOKS_ALLOW_PRIVATE=1.
    allow_private_targets: bool = False
    # Seconds to wait after each failed attempt of one event; past the last, the event
    # becomes a dead letter. ALLUSE_WEBHOOKS_RETRY_SCHEDULE_S=1,2,4.
    retry_schedule_s: Annotated[tuple[Annotated[float, Meta(ge=0, le=7 * 86_400)], ...], Meta(max_length=32)] = (
        5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    jitter_ratio: Annotated[float, Meta(ge=0, lt=1)] = 0.2
    timeout_s: Annotated[float, Meta(gt=0, le=300)] = 15.0
    # Deliveries in flight at once, over every endpoint (each endpoint has one at a time).
    concurrency_max: Annotated[int, Meta(ge=1, le=1024)] = 16
    # Consecutive failures that open an endpoint's circuit, and its cool-down before a trial.
    circuit_failures_max: Annotated[int, Meta(ge=1, le=1000)] = 5
    circuit_cooldown_s: Annotated[float, Meta(gt=0, le=86_400)] = 30.0
    # After a rotation the previous secret keeps signing (alongside the new one) this long.
    secret_grace_s: Annotated[float, Meta(ge=0, le=30 * 86_400)] = 86_400.0
    # An outbox sequence number not yet visible is waited for this long before delivery
    # passes it (a transaction still committing, or one that rolled back).
    gap_wait_s: Annotated[float, Meta(ge=0, le=600)] = 5.0
    # After a commit, wait this long for more before reading the outbox (fewer reads).
    poll_interval_s: Annotated[float, Meta(ge=0, le=10)] = 0.02
    endpoints_max: Annotated[int, Meta(ge=1, le=10_000)] = 100
    response_excerpt_bytes_max: Annotated[int, Meta(ge=0, le=65536)] = 512
    # Attempts kept per endpoint (the oldest are pruned).
    attempts_kept_max: Annotated[int, Meta(ge=10, le=10_000_000)] = 10_000


class Settings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    engine: EngineSettings = EngineSettings()
    supervision: SupervisionSettings = SupervisionSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()
    security: SecuritySettings = SecuritySettings()
    webhooks: WebhookSettings = WebhookSettings()
    rules: Rules = Rules()


class ConfigError(Exception):
    pass


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"configuration file {path} is not valid TOML: {error}") from error


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def _seconds_list(value: str) -> list[float]:
    """"1,2,4" -> [1.0, 2.0, 4.0] (ValueError for anything else)."""
    return [float(part) for part in value.split(",")]


ENVIRONMENT = {
    "ALLUSE_HOST": ("server", "host", str),
    "ALLUSE_PORT": ("server", "port", int),
    "ALLUSE_ADMIN_TOKEN": ("server", "admin_token", str),
    "ALLUSE_DATA_DIR": ("database", "data_dir", str),
    "ALLUSE_TLS_CERT_FILE": ("server", "tls_cert_file", str),
    "ALLUSE_TLS_KEY_FILE": ("server", "tls_key_file", str),
    "DATABASE_URL": ("database", "url", str),
    "ALLUSE_WAL_ARCHIVE_DIR": ("database", "wal_archive_dir", str),
    "ALLUSE_BACKUP_DIR": ("database", "backup_dir", str),
    "ALLUSE_REQUIRE_VERIFIED_TLS": ("database", "require_verified_tls",
                                    lambda v: v.strip().lower() in ("1", "true", "yes")),
    "ALLUSE_METRICS_TOKEN": ("server", "metrics_token", str),
    "ALLUSE_FAULT_INJECTION": ("engine", "fault_injection", _flag),
    "ALLUSE_STANDBY": ("engine", "standby", _flag),
    "ALLUSE_GC_YOUNG_THRESHOLD": ("engine", "gc_young_threshold", int),
    "ALLUSE_WEBHOOKS_ALLOW_PRIVATE": ("webhooks", "allow_private_targets", _flag),
    "ALLUSE_WEBHOOKS_RETRY_SCHEDULE_S": ("webhooks", "retry_schedule_s", _seconds_list),
}


def load_settings(environ: dict | None = None, overrides: dict | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    raw = _read_toml(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else {}
    if environ.get("ALLUSE_CONFIG"):
        raw = _merge(raw, _read_toml(Path(environ["ALLUSE_CONFIG"])))
    for variable, (section, key, kind) in ENVIRONMENT.items():
        value = environ.get(variable)
        if value:
            try:
                raw.setdefault(section, {})[key] = kind(value)
            except ValueError as error:
                raise ConfigError(f"{variable}={value!r} is not a valid {getattr(kind, '__name__', 'value')}") from error
    if overrides:
        raw = _merge(raw, overrides)
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as error:
        raise ConfigError(f"invalid configuration: {error}") from error
    _check_database_tls(settings.database)
    return settings


def admin_token_file(data_dir: str) -> Path:
    """Where the bootstrap admin token generated at first start is kept: the service
    writes it, the console's sign-in page names it, `alluse` and doctor read it."""
    return Path(data_dir).expanduser().resolve() / "admin-token"


def _check_database_tls(database: DatabaseSettings) -> None:
    """With `require_verified_tls`, only a DATABASE_URL that checks the server's
    certificate against a CA and its host name is accepted (libpq's and asyncpg's
    `sslmode=verify-full`); anything weaker could talk to an impostor."""
    if not database.require_verified_tls:
        return
    if not database.url:
        raise ConfigError("database.require_verified_tls is set but there is no DATABASE_URL "
                          "(the embedded server is reached over a local socket, not TLS)")
    query = parse_qs(urlsplit(database.url).query)
    mode = (query.get("sslmode") or [""])[-1]
    if mode != "verify-full":
        raise ConfigError(f"database.require_verified_tls is set but DATABASE_URL has sslmode={mode or '(none)'}; "
                          "use sslmode=verify-full with sslrootcert=<CA file>")
