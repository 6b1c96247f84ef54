"""TLS to an external PostgreSQL: the session's server behind a TLS endpoint on
127.0.0.1 with a trustme-made certificate (the embedded wheel's PostgreSQL is built
without SSL, so `ssl=on` cannot be used; the endpoint speaks PostgreSQL's own TLS
negotiation, so the client side is exactly what it is against a real server). The
engine works over `DATABASE_URL=...?sslmode=verify-full&sslrootcert=CA`; a client
that trusts another CA is refused; and with `require_verified_tls` the engine refuses to
start on a URL that does not verify (`alluse serve` exits 2 saying why)."""
from __future__ import annotations

import asyncio
import ssl
import struct
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
import trustme

from actors.api import Engine
from actors.settings import ConfigError, load_settings
from tests.ops_helpers import alluse, clean_env, free_port


SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class TlsFront:
    """A TLS endpoint speaking PostgreSQL's in-band TLS negotiation: it answers a
    client's SSLRequest with 'S', completes the TLS handshake with the given certificate,
    and relays the decrypted protocol to the real server's Unix socket. Clients that do
    not ask for TLS are disconnected (like a `hostnossl ... reject` rule). It stands in
    for `ssl=on` because the embedded server wheel is built without SSL support."""

    def __init__(self, socket_path: str, context: ssl.SSLContext):
        self.socket_path, self.context = socket_path, context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-front", daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        try:
            if await reader.readexactly(8) != SSL_REQUEST:
                return
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(self.context)
            backend_reader, backend_writer = await asyncio.open_unix_connection(self.socket_path)
            await asyncio.gather(self._pipe(reader, backend_writer), self._pipe(backend_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()
        asyncio.run_coroutine_threadsafe(self.server.wait_closed(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def tls_server(postgres_server_uri, tmp_path_factory):
    """The session's PostgreSQL 18 behind TLS on 127.0.0.1, with a trustme certificate."""
    place = tmp_path_factory.mktemp("db-tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(place / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(place / "other-ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    socket_dir = parse_qs(urlsplit(postgres_server_uri).query)["host"][0]
    front = TlsFront(f"{socket_dir}/.s.PGSQL.5432", context)
    try:
        yield {"port": front.port, "ca": place / "ca.pem", "other_ca": place / "other-ca.pem"}
    finally:
        front.close()


def url(server: dict, mode: str, ca: Path | None = None, database: str = "postgres") -> str:
    address = f"postgresql://postgres@127.0.0.1:{server['port']}/{database}?sslmode={mode}"
    return address + (f"&sslrootcert={ca}" if ca else "")


async def test_the_engine_works_over_verify_full_tls_to_postgresql(tls_server, database_url, tmp_path):
    database = urlsplit(database_url).path.lstrip("/")
    settings = load_settings({}, {"database": {"url": url(tls_server, "verify-full", tls_server["ca"], database),
                                               "data_dir": str(tmp_path), "require_verified_tls": True}})
    async with Engine(settings) as engine:
        account = await engine.create_account(name="TLS", type="revenue", owner="tls")
        entry = await engine.deposit(account.id, 12_345)
        assert entry.balance_after == 12_345
        assert (await engine.get_account(account.id)).balance == 12_345


async def test_a_server_certificate_from_another_ca_or_a_plain_connection_is_refused(tls_server):
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(url(tls_server, "verify-full", tls_server["other_ca"]), timeout=10)
    with pytest.raises((ConnectionError, OSError, asyncpg.PostgresError)):
        await asyncpg.connect(url(tls_server, "disable"), timeout=10)
    trusted = await asyncpg.connect(url(tls_server, "verify-full", tls_server["ca"]), timeout=10)
    try:
        assert await trusted.fetchval("SELECT 1") == 1
    finally:
        await trusted.close()


def test_require_verified_tls_refuses_a_url_that_does_not_verify(tls_server, tmp_path):
    for mode in ("require", "verify-ca", "prefer"):
        with pytest.raises(ConfigError, match=f"sslmode={mode}"):
            load_settings({"DATABASE_URL": url(tls_server, mode, tls_server["ca"]),
                           "ALLUSE_REQUIRE_VERIFIED_TLS": "1"})
    with pytest.raises(ConfigError, match="no DATABASE_URL"):
        load_settings({"ALLUSE_REQUIRE_VERIFIED_TLS": "1"})
    # Not told to require it: a weaker mode is the operator's choice.
    assert load_settings({"DATABASE_URL": url(tls_server, "require")}).database.url.endswith("sslmode=require")

    served = alluse("serve", env=clean_env(DATABASE_URL=url(tls_server, "require"), ALLUSE_REQUIRE_VERIFIED_TLS="1",
                                           ALLUSE_DATA_DIR=str(tmp_path), ALLUSE_PORT=str(free_port())))
    assert served.returncode == 2 and "sslmode=require" in served.stderr, served

