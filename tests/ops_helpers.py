"""Helpers of the operations tests: a fresh database on the session's server, the real
`alluse serve` in a subprocess, and the real `alluse` console script."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from tests.conftest import database_uri

ALLUSE = str(Path(sys.executable).parent / "alluse")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
COMMAND_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _on_server(server_uri: str, statement: str) -> None:
    """Runs one statement in the server's maintenance database."""
    async def run():
        admin = await asyncpg.connect(database_uri(server_uri, "postgres"))
        try:
            await admin.execute(statement)
        finally:
            await admin.close()

    asyncio.run(run())


def create_database(server_uri: str) -> str:
    name = f"t_{secrets.token_hex(6)}"
    _on_server(server_uri, f'CREATE DATABASE "{name}"')
    return database_uri(server_uri, name)


def drop_database(server_uri: str, url: str) -> None:
    _on_server(server_uri, f'DROP DATABASE IF EXISTS "{database_name(url)}" WITH (FORCE)')


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def clean_env(**settings: str) -> dict:
    """This process's environment without any ALLUSE_* or DATABASE_URL, plus `settings`."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("ALLUSE_") and name != "DATABASE_URL"}
    env.update(settings)
    return env


def alluse(*args: str, env: dict, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Runs the installed console script."""
    return subprocess.run([ALLUSE, *args], env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)


def alluse_json(*args: str, env: dict):
    result = alluse("--json", *args, env=env)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)


def http_request(port: int, method: str, path: str, *, context: ssl.SSLContext | None = None,
                 token: str | None = None, body: dict | None = None,
                 headers: dict | None = None) -> tuple[int, dict | str, dict]:
    """One request to 127.0.0.1 over HTTPS (with `context`) or plain HTTP: status, the
    JSON (or text) body, the response headers."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    all_headers = {"Authorization": f"Bearer {token}"} if token else {}
    all_headers.update(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
        payload = json.loads(raw) if response.getheader("Content-Type", "").startswith("application/json") \
            else raw.decode(errors="replace")
        return response.status, payload, dict(response.getheaders())
    finally:
        connection.close()


class ServiceProcess:
    """A service command in a subprocess with its output in files (a pipe nobody reads
    could fill up)."""

    def __init__(self, command: list[str], env: dict, workdir: Path, name: str = "serve"):
        self.env, self.workdir = env, workdir
        self.stdout_path, self.stderr_path = workdir / f"{name}.out", workdir / f"{name}.err"
        self.stdout, self.stderr = open(self.stdout_path, "wb"), open(self.stderr_path, "wb")
        self.process = subprocess.Popen(command, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                                        stdout=self.stdout, stderr=self.stderr)

    def output(self) -> str:
        self.stdout.flush()
        self.stderr.flush()
        return (f"--- stdout ---\n{self.stdout_path.read_text(errors='replace')}"
                f"\n--- stderr ---\n{self.stderr_path.read_text(errors='replace')}")

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            self.stdout.close()
            self.stderr.close()


class Service(ServiceProcess):
    """`alluse serve` on a port, with a small HTTP client."""

    def __init__(self, env: dict, workdir: Path, port: int):
        super().__init__([ALLUSE, "serve"], env, workdir)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, *, token: str | None = None, body: dict | None = None,
                headers: dict | None = None) -> tuple[int, dict | str, dict]:
        return http_request(self.port, method, path, token=token, body=body, headers=headers)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"alluse serve exited with {self.process.returncode}\n{self.output()}")
            try:
                if self.request("GET", "/ready")[0] == 200:
                    return
            except (OSError, http.client.HTTPException) as error:
                last_error = error
            time.sleep(0.1)
        raise AssertionError(f"not ready within {START_TIMEOUT_S} s ({last_error!r})\n{self.output()}")
