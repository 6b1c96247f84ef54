"""Configuration: `config/default.toml` < the file named by ALLUSE_CONFIG < environment
variables. Typed with msgspec; an unknown key is an error that names it."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated

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


class EngineSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    actor_workers: Annotated[int, Meta(ge=1, le=limits.ACTOR_WORKERS_MAX)] = 4
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
    # Reinvest every portfolio for the quarter that just ended, once it has ended.
    reinvest_schedule: bool = True
    tree_nodes_max: Annotated[int, Meta(ge=1, le=100_000)] = 10_000


class SupervisionSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    restarts_max: Annotated[int, Meta(ge=0, le=1000)] = 5
    window_s: Annotated[float, Meta(gt=0, le=86_400)] = 60.0


class AnalyticsSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Annual risk-free rate for the Sharpe ratio, as a fraction (0.04 = 4%).
    risk_free_rate: Annotated[float, Meta(ge=-1, le=1)] = 0.0


class Settings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    engine: EngineSettings = EngineSettings()
    supervision: SupervisionSettings = SupervisionSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()
    security: SecuritySettings = SecuritySettings()
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


ENVIRONMENT = {
    "ALLUSE_HOST": ("server", "host", str),
    "ALLUSE_PORT": ("server", "port", int),
    "ALLUSE_ADMIN_TOKEN": ("server", "admin_token", str),
    "ALLUSE_DATA_DIR": ("database", "data_dir", str),
    "ALLUSE_TLS_CERT_FILE": ("server", "tls_cert_file", str),
    "ALLUSE_TLS_KEY_FILE": ("server", "tls_key_file", str),
    "DATABASE_URL": ("database", "url", str),
    "ALLUSE_FAULT_INJECTION": ("engine", "fault_injection", lambda v: v.strip().lower() in ("1", "true", "yes")),
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
        return msgspec.convert(raw, Settings)
    except msgspec.ValidationError as error:
        raise ConfigError(f"invalid configuration: {error}") from error
