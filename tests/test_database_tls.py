"""TLS to an external PostgreSQL with a trustme-made certificate: the engine works over
`DATABASE_URL=...?sslmode=verify-full&sslrootcert=CA`; a client that trusts another CA, or
one that does not ask for TLS, is refused; and with `require_verified_tls` the engine
refuses to start on a URL that does not verify (`alluse serve` exits 2 saying why).

The server is a real PostgreSQL with `ssl = on` when one is installed: Debian's
`postgresql` package (`.ci/run` installs it), its `initdb` and `pg_ctl` run as the
package's `postgres` user when the tests run as root (PostgreSQL refuses root), as the
tests' own user otherwise, on 127.0.0.1 with `hostssl` allowed and `hostnossl` rejected.
The embedded wheel's PostgreSQL is built without SSL, so where no such server is
installed (or with ALLUSE_TEST_DATABASE_TLS=front) the session's server stands behind a
TLS endpoint that speaks PostgreSQL's own TLS negotiation instead: the client side is
then exactly the same, but PostgreSQL's `ssl = on` is not exercised."""
from __future__ import annotations

import asyncio
import glob
import os
import pwd
import secrets
import shutil
import ssl
import struct
import subprocess
import tempfile
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


class DebianPostgres:
    """A throwaway PostgreSQL of Debian's `postgresql` package with `ssl = on`: its own
    data directory in a fresh directory under the system's temporary directory (one the
    server's user can reach), listening on 127.0.0.1 only, TLS required for TCP."""

    START_TIMEOUT_S = 60

    def __init__(self, bin_dir: str, certificate: trustme.LeafCert):
        self.bin_dir = bin_dir
        self.port = free_port()
        self.user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.place = Path(tempfile.mkdtemp(prefix="alluse-pg-ssl-"))
        self.data = self.place / "data"
        certificate.cert_chain_pems[0].write_to_path(str(self.place / "server.crt"))
        certificate.private_key_pem.write_to_path(str(self.place / "server.key"))
        os.chmod(self.place / "server.key", 0o600)  # PostgreSQL refuses a key others can read
        if self.user is not None:
            for path in (self.place, self.place / "server.crt", self.place / "server.key"):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale",
                  "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.place}'\nssl = on\n"
                       f"ssl_cert_file = '{self.place / 'server.crt'}'\nssl_key_file = '{self.place / 'server.key'}'\n"
                       "fsync = off\nshared_buffers = 16MB\nmax_connections = 40\n")
        (self.data / "pg_hba.conf").write_text("local all all trust\n"
                                               "hostssl all all 127.0.0.1/32 trust\n"
                                               "hostnossl all all 127.0.0.1/32 reject\n")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.place / "server.log"), "-w",
                  "-t", str(self.START_TIMEOUT_S), "start")

    @staticmethod
    def installed() -> str | None:
        """The bin directory of the newest installed Debian PostgreSQL, if it can run here."""
        if os.environ.get("ALLUSE_TEST_DATABASE_TLS") == "front":
            return None
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
        if not found:
            return None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return None
        return os.path.dirname(found[-1])

    def _run(self, program: str, *args: str) -> None:
        options = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []} if self.user else {}
        done = subprocess.run([os.path.join(self.bin_dir, program), *args], capture_output=True, text=True,
                              timeout=self.START_TIMEOUT_S + 30, cwd=self.place, check=False, **options)
        if done.returncode != 0:
            log = self.place / "server.log"
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stdout}{done.stderr}"
                               + (log.read_text() if log.exists() else ""))

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.place, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_server(postgres_server_uri, tmp_path_factory):
    """PostgreSQL over TLS on 127.0.0.1 with a trustme certificate: Debian's server with
    `ssl = on` when installed, else the session's server behind a TLS front."""
    place = tmp_path_factory.mktemp("db-tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(place / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(place / "other-ca.pem"))
    certificate = ca.issue_cert("127.0.0.1")
    found = {"ca": place / "ca.pem", "other_ca": place / "other-ca.pem"}
    bin_dir = DebianPostgres.installed()
    if bin_dir is not None:
        server = DebianPostgres(bin_dir, certificate)
        try:
            yield {**found, "port": server.port, "kind": "postgresql ssl=on"}
        finally:
            server.stop()
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    socket_dir = parse_qs(urlsplit(postgres_server_uri).query)["host"][0]
    front = TlsFront(f"{socket_dir}/.s.PGSQL.5432", context)
    try:
        yield {**found, "port": front.port, "kind": "tls front"}
    finally:
        front.close()


def url(server: dict, mode: str, ca: Path | None = None, database: str = "postgres") -> str:
    address = f"postgresql://postgres@127.0.0.1:{server['port']}/{database}?sslmode={mode}"
    return address + (f"&sslrootcert={ca}" if ca else "")


async def test_the_engine_works_over_verify_full_tls_to_postgresql(tls_server, tmp_path):
    verified = url(tls_server, "verify-full", tls_server["ca"])
    database = f"tls_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(verified, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
        settings = load_settings({}, {"database": {"url": url(tls_server, "verify-full", tls_server["ca"], database),
                                                   "data_dir": str(tmp_path), "require_verified_tls": True}})
        async with Engine(settings) as engine:
            account = await engine.create_account(name="TLS", type="revenue", owner="tls")
            entry = await engine.deposit(account.id, 12_345)
            assert entry.balance_after == 12_345
            assert (await engine.get_account(account.id)).balance == 12_345
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


async def test_a_server_certificate_from_another_ca_or_a_plain_connection_is_refused(tls_server):
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(url(tls_server, "verify-full", tls_server["other_ca"]), timeout=10)
    with pytest.raises((ConnectionError, OSError, asyncpg.PostgresError)):
        await asyncpg.connect(url(tls_server, "disable"), timeout=10)
    trusted = await asyncpg.connect(url(tls_server, "verify-full", tls_server["ca"]), timeout=10)
    try:
        assert await trusted.fetchval("SELECT 1") == 1
        if tls_server["kind"] == "postgresql ssl=on":
            # PostgreSQL itself holds the TLS session (not a front before it).
            assert await trusted.fetchval("SHOW ssl") == "on"
            assert await trusted.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
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

