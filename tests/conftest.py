"""Shared fixtures: one embedded PostgreSQL for the whole session, a fresh database per
test, and a started `Engine` on it. Works as root (the wheel then runs the server as its
own system user) and as a normal user."""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from urllib.parse import urlsplit, urlunsplit

# The wheel fixes its lock-file location (under XDG_RUNTIME_DIR) when it is imported and
# warns when the variable is unset; give it a private, per-user directory (reused by
# every session) before anything imports it.
if not os.environ.get("XDG_RUNTIME_DIR"):
    _runtime_dir = os.path.join(tempfile.gettempdir(), f"alluse-runtime-{os.getuid()}")
    os.makedirs(_runtime_dir, mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = _runtime_dir

import asyncpg  # noqa: E402
import pytest  # noqa: E402
import pytest_asyncio  # noqa: E402

from actors.api import Engine  # noqa: E402
from actors.settings import load_settings  # noqa: E402
from persistence.embedded import EmbeddedServer  # noqa: E402


def database_uri(server_uri: str, database: str) -> str:
    """The server's URI (`postgresql://postgres:@/postgres?host=/socket/dir`) with another
    database name in its path."""
    parts = urlsplit(server_uri)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def postgres_server_uri():
    """One embedded PostgreSQL server for the session, in a short temporary path (the
    Unix socket lives in the data directory and socket paths are limited in length)."""
    data_dir = tempfile.mkdtemp(prefix="alluse-pg-")
    server = EmbeddedServer(data_dir)
    try:
        uri = server.start()
        yield uri
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session")
async def database_url(postgres_server_uri):
    """A fresh, empty database for one test; dropped afterwards (forcibly, so a
    connection left behind by a failing test cannot keep it alive)."""
    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(database_uri(postgres_server_uri, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield database_uri(postgres_server_uri, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def postgres_admin_url(postgres_server_uri):
    """The server's maintenance database, for tests that act on a test database from
    outside (terminate its connections, refuse new ones)."""
    return database_uri(postgres_server_uri, "postgres")


def engine_settings(database_url: str, **engine_overrides):
    overrides = {"database": {"url": database_url}}
    if engine_overrides:
        overrides["engine"] = engine_overrides
    return load_settings({}, overrides)


@pytest_asyncio.fixture(loop_scope="session")
async def engine(database_url):
    started = Engine(engine_settings(database_url))
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


WAIT_S = 15.0


async def eventually(probe, what: str = "condition", *, timeout_s: float = WAIT_S):
    """Polls `probe` (a coroutine function) until it returns something truthy; an
    `Unavailable` counts as "not yet". Fails the test after `timeout_s`. Tests wait on
    conditions this way, never on a bare sleep."""
    from engine.errors import Unavailable

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last_error = None
    while True:
        try:
            result = await probe()
            if result:
                return result
        except Unavailable as error:
            last_error = error
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last error: {last_error!r})")
        await asyncio.sleep(0.02)
