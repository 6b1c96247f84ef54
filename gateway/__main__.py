"""`python -m gateway` (what `make run` starts): loads configuration, starts the engine
(and the embedded PostgreSQL unless DATABASE_URL is set) and serves HTTP on uvloop."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import ssl
import sys

import msgspec
import uvloop
from aiohttp import web

from actors.availability import AnotherEngine
from actors.settings import ConfigError, admin_token_file, load_settings
from gateway import logs
from gateway.app import create_app, server_options


def _admin_token(data_dir: str) -> tuple[str, bool]:
    """ALLUSE_ADMIN_TOKEN when set; otherwise one generated at first start and kept in
    `<data_dir>/admin-token` (mode 0600) so restarts keep working with it."""
    path = admin_token_file(data_dir)
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token)
    return token, True


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """A server TLS context (TLS 1.2 or newer) when both files are configured."""
    if not cert_file and not key_file:
        return None
    if not cert_file:
        raise ConfigError("HTTPS needs server.tls_cert_file (ALLUSE_TLS_CERT_FILE) too: only the key is set")
    if not key_file:
        raise ConfigError("HTTPS needs server.tls_key_file (ALLUSE_TLS_KEY_FILE) too: only the certificate is set")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


def main() -> int:
    try:
        logs.configure(level=os.environ.get("ALLUSE_LOG_LEVEL", "INFO"),
                       format=os.environ.get("ALLUSE_LOG_FORMAT", "text").strip().lower())
        settings = load_settings()
    except (ConfigError, ValueError) as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    # Bind first: a port in use is one clear line (and exit code 2) before anything starts
    # or is printed, not a traceback after the engine started and a new admin token.
    try:
        listener = bind(settings.server.host, settings.server.port)
    except OSError as error:
        print(f"cannot listen on {settings.server.host}:{settings.server.port}: {error.strerror or error}",
              file=sys.stderr)
        return 2
    generated = False
    if not settings.server.admin_token:
        token, generated = _admin_token(settings.database.data_dir)
        settings = msgspec.structs.replace(settings, server=msgspec.structs.replace(settings.server,
                                                                                    admin_token=token))
    # Now that the secrets are known, every log line is scrubbed of them too.
    logs.configure(level=os.environ.get("ALLUSE_LOG_LEVEL", "INFO"),
                   format=os.environ.get("ALLUSE_LOG_FORMAT", "text").strip().lower(),
                   secrets=(settings.server.admin_token, settings.server.metrics_token))
    access_log = os.environ.get("ALLUSE_ACCESS_LOG", "").strip().lower() in ("1", "true", "yes")
    server = settings.server
    try:
        tls = tls_context(server.tls_cert_file, server.tls_key_file)
    except (ConfigError, OSError, ssl.SSLError) as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    scheme = "https" if tls is not None else "http"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = create_app(settings)

    async def announce(_app):
        print(f"ALL-USE Account Engine listening on {scheme}://{server.host}:{listener.getsockname()[1]} "
              f"(console at /, API reference at /docs)", flush=True)
        if generated:
            print(f"admin token (generated, kept in {admin_token_file(settings.database.data_dir)}): "
                  f"{server.admin_token}", flush=True)
        elif not os.environ.get("ALLUSE_ADMIN_TOKEN"):
            print(f"admin token: in {admin_token_file(settings.database.data_dir)}", flush=True)

    # on_startup runs after the engine started (cleanup_ctx) and the socket is already
    # bound and listening, so "listening" is true when it is printed.
    app.on_startup.append(announce)
    # run_app hands these on to each connection's request handler (there is no
    # `handler_args` here: an unknown keyword makes aiohttp drop all of them, silently
    # but for a warning, access_log=None included).
    # The access log is off unless asked for (ALLUSE_ACCESS_LOG=1): a line per request
    # costs throughput.
    try:
        web.run_app(app, sock=listener, print=None, shutdown_timeout=15, ssl_context=tls,
                    access_log=logging.getLogger("alluse.access") if access_log else None,
                    access_log_class=logs.AccessLogger, **server_options(settings))
    except AnotherEngine as refusal:
        # A second engine on the same data directory or database: one clear line.
        print(f"not starting: {refusal}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
