"""One writer per database (issue 14): the fence.

Two locks, each released by the operating system or PostgreSQL when their holder dies,
so a crashed engine never leaves a lock behind and nothing here needs a lease, a
heartbeat or an election of our own:
- the *data directory lock*: an exclusive `flock` on `<data_dir>/engine.lock`, for the
  embedded server. Taken before the server is started or adopted, so a second engine on
  the same directory never touches the server (the wheel would otherwise let it adopt a
  running one). The file says who holds it (host, pid, port), for the refusal message;
- the *writer lock*: a session-level PostgreSQL advisory lock held by the writer's own
  connection, for any database (embedded or DATABASE_URL, one host or several). Every
  batch commits on the connection that holds it, so no engine that lost it can commit:
  PostgreSQL's lock manager is the arbiter. The same statement names the connection
  (`application_name`), so another engine can say who writes, and asks the server to
  notice a dead engine host within seconds (TCP keepalives), which frees the lock for a
  standby."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

# pg_advisory_lock keys of the engine (7420001 serializes migrations).
WRITER_LOCK_KEY = 7420002
LOCK_FILE = "engine.lock"
APPLICATION_PREFIX = "alluse-writer"
# A dead engine host is noticed by the server after about idle + interval * count seconds.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_COUNT = 3
# PostgreSQL 14+: a backend running a statement checks its client this often.
CLIENT_CHECK_INTERVAL = "1s"

TAKE_WRITER_LOCK = """
SELECT pg_try_advisory_lock($1) AS locked,
       set_config('application_name', $2, false),
       set_config('tcp_keepalives_idle', $3, false),
       set_config('tcp_keepalives_interval', $4, false),
       set_config('tcp_keepalives_count', $5, false)"""
# Who holds the writer lock in this database (its application_name and address).
WRITER_LOCK_HOLDER = """
SELECT a.application_name, coalesce(host(a.client_addr), 'local socket') AS address, a.pid
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database
                                                                 WHERE datname = current_database())
  AND l.classid = 0 AND l.objid = $1 AND l.objsubid = 1"""
CLIENT_CHECK = "SELECT set_config('client_connection_check_interval', $1, false)"


def writer_name(port: int | None = None) -> str:
    """`alluse-writer <host> pid <pid> [port <port>]`: the writer connection's name."""
    name = f"{APPLICATION_PREFIX} {socket.gethostname()} pid {os.getpid()}"
    return f"{name} port {port}" if port else name


async def take_writer_lock(connection, name: str) -> bool:
    """Tries (never waits) to take the writer lock on `connection` (an asyncpg
    connection); True if this session holds it now. Also names the session and sets its
    keepalives. One round trip, once per connection."""
    row = await connection.fetchrow(TAKE_WRITER_LOCK, WRITER_LOCK_KEY, name[:63], str(KEEPALIVE_IDLE_S),
                                    str(KEEPALIVE_INTERVAL_S), str(KEEPALIVE_COUNT))
    try:
        await connection.execute(CLIENT_CHECK, CLIENT_CHECK_INTERVAL)
    except Exception:  # noqa: BLE001 - older servers lack the setting; keepalives still work
        pass
    return bool(row["locked"])


async def release_writer_lock(connection) -> None:
    await connection.execute("SELECT pg_advisory_unlock($1)", WRITER_LOCK_KEY)


async def writer_lock_holder(connection) -> str:
    """Who holds the writer lock, as a phrase for a log line ("unknown" if it was just
    released)."""
    row = await connection.fetchrow(WRITER_LOCK_HOLDER, WRITER_LOCK_KEY)
    if row is None:
        return "unknown (the lock was just released)"
    return f"{row['application_name'] or 'an unnamed session'} ({row['address']}, backend {row['pid']})"


class DataDirectoryLock:
    """An exclusive `flock` on `<data_dir>/engine.lock`, held while the engine runs."""

    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir).expanduser().resolve() / LOCK_FILE
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def try_acquire(self, description: str) -> bool:
        """Takes the lock without waiting; True if held now. Writes `description` (who
        holds it) into the file once held."""
        if self._descriptor is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (description + "\n").encode(), 0)
        self._descriptor = descriptor
        return True

    def holder(self) -> str:
        """What the holder wrote about itself."""
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)   # closing the last descriptor releases the flock
            self._descriptor = None
