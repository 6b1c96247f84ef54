"""HTTPS as shipped: `python -m gateway` in a subprocess, configured through the
environment (ALLUSE_TLS_CERT_FILE / ALLUSE_TLS_KEY_FILE) with a certificate for
127.0.0.1 issued by a throwaway CA (trustme), on a fresh test database. Clients that
trust that CA get the API over HTTPS; plain HTTP and clients that do not trust it get
nothing. Half a TLS configuration is a configuration error (exit code 2)."""
from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from tests.ops_helpers import ServiceProcess, http_request

ADMIN_TOKEN = "https-admin-token-0123456789abcdef"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_env(database_url: str, port: int, data_dir: Path, **extra: str) -> dict:
    """This process's environment without any ALLUSE_* or DATABASE_URL of its own, plus
    the given settings."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("ALLUSE_") and name != "DATABASE_URL"}
    env.update({"DATABASE_URL": database_url, "ALLUSE_PORT": str(port), "ALLUSE_HOST": "127.0.0.1",
                "ALLUSE_ADMIN_TOKEN": ADMIN_TOKEN, "ALLUSE_DATA_DIR": str(data_dir),
                "ALLUSE_LOG_LEVEL": "WARNING"})
    env.update(extra)
    return env


@pytest.fixture
def certificates(tmp_path) -> dict[str, Path]:
    """A CA, and a server certificate (with its chain) and key for 127.0.0.1, as PEM files."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server-cert.pem", "key": tmp_path / "server-key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def request(port: int, method: str, path: str, *, context: ssl.SSLContext | None, token: str | None = None,
            body: dict | None = None, extra_headers: dict | None = None) -> tuple[int, dict | str]:
    """One request over HTTPS (with `context`) or plain HTTP (without)."""
    status, payload, _ = http_request(port, method, path, context=context, token=token, body=body,
                                      headers=extra_headers)
    return status, payload


def wait_for_health(service: ServiceProcess, port: int, context: ssl.SSLContext) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            pytest.fail(f"python -m gateway exited with {service.process.returncode}\n{service.output()}")
        try:
            status, body = request(port, "GET", "/health", context=context)
            if status == 200:
                return body
        except (OSError, http.client.HTTPException) as error:
            last_error = error
        time.sleep(0.1)
    pytest.fail(f"no HTTPS /health within {START_TIMEOUT_S} s (last error {last_error!r})\n{service.output()}")


def test_the_service_serves_https_only_with_the_configured_certificate(database_url, certificates, tmp_path):
    port = free_port()
    env = service_env(database_url, port, tmp_path / "data", ALLUSE_TLS_CERT_FILE=str(certificates["cert"]),
                      ALLUSE_TLS_KEY_FILE=str(certificates["key"]))
    trusted = ssl.create_default_context(cafile=str(certificates["ca"]))
    service = ServiceProcess([sys.executable, "-m", "gateway"], env, tmp_path, "gateway")
    try:
        assert wait_for_health(service, port, trusted) == {"status": "ok"}
        assert f"listening on https://127.0.0.1:{port}" in service.output()

        # An authenticated request, and a committed change, over HTTPS.
        status, principal = request(port, "GET", "/v1/whoami", context=trusted, token=ADMIN_TOKEN)
        assert status == 200 and principal["role"] == "admin", principal
        status, account = request(port, "POST", "/v1/accounts", context=trusted, token=ADMIN_TOKEN,
                                  body={"name": "Rev-Acc", "type": "revenue", "owner": "ann"})
        assert status == 201 and account["balance"] == 0, (account, service.output())
        status, read = request(port, "GET", f"/v1/accounts/{account['id']}", context=trusted, token=ADMIN_TOKEN)
        assert status == 200 and read["id"] == account["id"], read
        status, error = request(port, "GET", "/v1/whoami", context=trusted, token="not-a-token")
        assert status == 401 and error["error"]["code"] == "unauthorized", error

        # The service applies its [security] header limits (64 headers by default) and
        # keeps no access log (it would be the one log line per request).
        status, error = request(port, "GET", "/v1/whoami", context=trusted, token=ADMIN_TOKEN,
                                extra_headers={f"X-Extra-{index}": "v" for index in range(70)})
        assert status == 400 and error["error"]["code"] == "bad_request", error
        assert "aiohttp.access" not in service.output() and "Failed to create request handler" not in \
            service.output(), service.output()

        # Plain HTTP to the same port gets no answer.
        with pytest.raises((OSError, http.client.HTTPException)):
            request(port, "GET", "/health", context=None)
        # Nor does a client that does not trust the CA (the system's trust store only).
        with pytest.raises(ssl.SSLCertVerificationError):
            request(port, "GET", "/health", context=ssl.create_default_context())

        # Still serving after all that.
        status, body = request(port, "GET", "/health", context=trusted)
        assert status == 200, body
        assert service.process.poll() is None, service.output()
    finally:
        service.stop()
    # SIGTERM is a graceful shutdown, not a crash.
    assert service.process.returncode == 0, (service.process.returncode, service.output())


@pytest.mark.parametrize("configured, missing", [("ALLUSE_TLS_CERT_FILE", "tls_key_file"),
                                                 ("ALLUSE_TLS_KEY_FILE", "tls_cert_file")])
def test_half_a_tls_configuration_is_refused_with_exit_code_2(database_url, certificates, tmp_path, configured,
                                                              missing):
    path = certificates["cert"] if configured == "ALLUSE_TLS_CERT_FILE" else certificates["key"]
    env = service_env(database_url, free_port(), tmp_path / "data", **{configured: str(path)})
    try:
        completed = subprocess.run([sys.executable, "-m", "gateway"], env=env, cwd=tmp_path, capture_output=True,
                                   text=True, stdin=subprocess.DEVNULL, timeout=60)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"python -m gateway kept running with only {configured} set: {error.stderr!r}")
    assert completed.returncode == 2, (completed.returncode, completed.stdout, completed.stderr)
    assert "configuration error" in completed.stderr and missing in completed.stderr, completed.stderr
    assert "listening" not in completed.stdout, completed.stdout
