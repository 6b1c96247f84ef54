"""The aiohttp application: `create_app(settings, engine=None)`. Routes live in one table
(`ROUTES`, also the source of /openapi.json); middlewares give every response a request
id, map every failure to the SPEC's error shape, check the bearer token, and record
metrics. The event loop never blocks on an actor: the engine replies through futures."""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from engine import limits, text
from engine.errors import (
    EngineError, IdempotencyKeyReused, NotFound, Refused, Unavailable, ValidationFailed,
)
from engine.requests import (
    CreateAccountRequest, CreatePortfolioRequest, CreateTokenRequest, DepositRequest, FaultRequest, ForkRequest, ProjectionRequest,
    ReinvestRequest, TradeRequest, TransferRequest, UpdateAccountRequest, WithdrawalRequest, normalized_owner,
)
from engine.model import GrowthOperation, Transaction, Transfer
from engine.projection import Projection
from engine.analytics import AccountAnalytics, PortfolioAnalytics
from engine.reports import PortfolioTree, PortfolioView, Reinvestment
from actors.api import Engine
from actors.context import AUDIT_CONTEXT
from actors.ids import new_request_id
from actors.security import BOOTSTRAP, AuditVerification, CreatedToken, TokenInfo
from actors import webhook_views
from engine.webhooks import CreateWebhookRequest, UpdateWebhookRequest
from engine.audit import AuditContext, Principal
from gateway import hardening, permissions, protocol
from gateway.abuse import FailureWindows, TokenBuckets, retry_after
from actors.metrics import LATENCY_BUCKETS_S
from actors.settings import Settings
from gateway import views
from gateway import logs
from actors import health_metrics

log = logging.getLogger("alluse.gateway")

ENGINE = web.AppKey("engine", Engine)
SETTINGS = web.AppKey("settings", Settings)
ADMIN_TOKEN = web.AppKey("admin_token", str)
HTTP_METRICS = web.AppKey("http_metrics", object)
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
AUDIT = web.RequestKey("audit", AuditContext)
ERROR_CODE = web.RequestKey("error_code", str)
GUARD = web.AppKey("guard", object)
# Who a request without a valid token is, in the audit log.
ANONYMOUS = Principal(token_id="anonymous", role="none")
MUTATING_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
# Mutating methods that change nothing (a projection is a computation).
NOT_CHANGES = frozenset({("POST", "/v1/projections")})
# Routes whose whole work the engine bounds by its operation timeout itself (the money
# operations, the hot path): the gateway adds no timer of its own to them. Every other
# /v1 request runs under `operation_timeout_s + REQUEST_TIMEOUT_MARGIN_S`.
ENGINE_BOUNDED = frozenset({("POST", "/v1/transfers"), ("POST", "/v1/accounts/{account_id}/deposits"),
                            ("POST", "/v1/accounts/{account_id}/withdrawals"),
                            ("POST", "/v1/accounts/{account_id}/trades")})
REQUEST_TIMEOUT_MARGIN_S = 0.5

JSON = "application/json"
RETRY_AFTER_S = "1"
WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="alluse"'}


class HttpError(Exception):
    """A client mistake found by the gateway itself (before the engine)."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or {}
        self.headers = headers


def _status_of(error: EngineError) -> int:
    if isinstance(error, ValidationFailed) or error.code == "validation_failed":
        return 422
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, (Refused, IdempotencyKeyReused)):
        return 409
    if isinstance(error, Unavailable):
        return 503
    return 500


def error_response(request: web.Request, status: int, code: str, message: str, details: dict | None = None,
                   headers: dict | None = None) -> web.Response:
    body = views.ErrorResponse(error=views.ErrorBody(code=code, message=message, details=details or {}),
                               request_id=request.get(REQUEST_ID, ""))
    request[ERROR_CODE] = code
    return web.Response(status=status, body=views.encode(body), content_type=JSON, headers=headers)


_PATH = re.compile(r"`\$\.?([^`]*)`")
_NAMED_FIELD = re.compile(r"field `([^`]+)`")


def _validation_details(error: msgspec.ValidationError) -> dict:
    """msgspec says where (`at $.a.b`) and sometimes which field (`field x`): join them
    into a dotted path, e.g. `weekly_return_bps.bonds`."""
    message = str(error)
    path, name = _PATH.search(message), _NAMED_FIELD.search(message)
    parts = [m.group(1) for m in (path, name) if m is not None and m.group(1)]
    return {"field": ".".join(parts), "reason": message}


# HTTP methods named in metrics as themselves; any other method aiohttp's parser accepts
# (WebDAV's and a few dozen more) is "OTHER": no route has them.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# -- middlewares -------------------------------------------------------------------------
@web.middleware
async def errors_middleware(request: web.Request, handler):
    request[REQUEST_ID] = request.headers.get("X-Request-Id", "")[:64] or new_request_id()
    logs.REQUEST_ID.set(request[REQUEST_ID])
    started = time.perf_counter()
    try:
        response = await handler(request)
    except HttpError as error:
        response = error_response(request, error.status, error.code, error.message, error.details, error.headers)
    except EngineError as error:
        status = _status_of(error)
        headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
        code = error.code if status != 500 else "internal_error"
        response = error_response(request, status, code, error.message, error.details, headers)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(request, 413, "payload_too_large", "the request body is too large",
                                  {"body_max_bytes": request.app[SETTINGS].server.body_max_bytes})
    except web.HTTPNotFound:
        response = error_response(request, 404, "not_found", "no such route")
    except web.HTTPMethodNotAllowed as error:
        allowed = sorted(error.allowed_methods)
        response = error_response(request, 405, "method_not_allowed", "method not allowed on this route",
                                  {"allowed": allowed}, {"Allow": ", ".join(allowed)})
    except web.HTTPException as error:
        response = error_response(request, error.status, "http_error", error.reason)
    except Exception:  # a bug: log it with the request id, leak nothing
        log.exception("unhandled error in %s %s (request %s)", request.method, request.path, request[REQUEST_ID])
        response = error_response(request, 500, "internal_error", "internal error; quote the request id")
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    await _audit_outcome(request, response)
    metrics = request.app[HTTP_METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "OTHER"   # bounded label values
    metrics.observe(method, route, response.status, time.perf_counter() - started)
    return response


def _route_key(request: web.Request) -> tuple[str, str]:
    resource = request.match_info.route.resource
    return request.method, resource.canonical if resource is not None else request.path


class Guard:
    """The edge's abuse limits (gateway.abuse), sized by `[security]`."""

    def __init__(self, settings: Settings):
        security = settings.security
        self.buckets = TokenBuckets(security.rate_limit_per_s, security.rate_limit_burst)
        self.invalid = FailureWindows(security.invalid_tokens_max, security.invalid_tokens_window_s)
        self.body_read_timeout_s = security.body_read_timeout_s
        # Every request is answered within the operation timeout and a little more, even
        # one that waits on a database that does not answer (issue 14).
        self.request_timeout_s = settings.engine.operation_timeout_s + REQUEST_TIMEOUT_MARGIN_S


def _bearer_token(request: web.Request) -> str | None:
    """The request's bearer token, or None: no `Authorization` header, another scheme, an
    empty token, or two headers (not a list header, RFC 9110: which token acts would be
    a guess)."""
    if len(request.headers.getall("Authorization", ())) > 1:
        return None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _principal(request: web.Request) -> Principal | None:
    token = _bearer_token(request)
    if token is None:
        return None
    if hmac.compare_digest(token.encode("utf-8", "surrogatepass"), request.app[ADMIN_TOKEN].encode()):
        return BOOTSTRAP
    return _engine(request).security.authenticate(token)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Every /v1 request: a valid token (401), within its rate (429), a role the
    permission table allows (403), and for an owner-scoped token, only that owner's
    data (404). The request runs with its audit context set, so every commit it causes
    records who asked."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    availability = _engine(request).availability
    refusal = availability.refusal
    if refusal is not None:
        # A standby (or an engine that is starting, or lost the writer lock) has no tokens
        # and no trustworthy memory: it answers nothing but /health and /ready.
        raise refusal.again()
    guard: Guard = request.app[GUARD]
    now = time.monotonic()
    client = request.remote or ""
    method, path = _route_key(request)
    principal = _principal(request)
    if principal is None:
        # Only invalid attempts are throttled: a valid token from the same address works.
        blocked = guard.invalid.blocked_for(client, now)
        if blocked:
            raise HttpError(429, "too_many_invalid_tokens", "too many requests with missing or invalid tokens",
                            headers={"Retry-After": retry_after(blocked)})
    context = AuditContext(principal or ANONYMOUS, request_id=request[REQUEST_ID], client=client,
                           route=f"{method} {path}")
    request[AUDIT] = context
    if principal is None:
        guard.invalid.fail(client, now)
        raise HttpError(401, "unauthorized", "missing or invalid bearer token", headers=dict(WWW_AUTHENTICATE))
    wait = guard.buckets.take(principal.token_id, now)
    if wait:
        raise HttpError(429, "rate_limited", "this token's request rate is over its limit",
                        {"rate_limit_per_s": guard.buckets.rate_per_s}, headers={"Retry-After": retry_after(wait)})
    request[PRINCIPAL] = principal
    permission = permissions.PERMISSIONS.get((method, path))
    if permission is not None:
        if not permissions.allowed(permission, principal.role, principal.owner):
            why = (f"the {principal.role} role may not do this" if principal.role not in permission.roles
                   else "an owner-scoped token may not use this route")
            raise HttpError(403, "forbidden", why, {"role": principal.role})
        await _check_scope(request, principal.owner, permission.scope)
    if method in MUTATING_METHODS:
        refusal = availability.write_refusal
        if refusal is not None and (method, path) not in NOT_CHANGES:
            availability.count_refusal()
            raise refusal.again()   # the database is away, full, or not ours: say so at once
    reset = AUDIT_CONTEXT.set(context)
    try:
        if (method, path) in ENGINE_BOUNDED:
            response = await handler(request)
        else:
            async with asyncio.timeout(guard.request_timeout_s):
                response = await handler(request)
    except TimeoutError:
        raise Unavailable("the request did not finish in time; retry", code="operation_timeout") from None
    finally:
        AUDIT_CONTEXT.reset(reset)
    if context.replayed:
        response.headers["Idempotency-Replayed"] = "true"
    return response


async def _check_scope(request: web.Request, owner: str | None, scope: str) -> None:
    """An owner-scoped token meets another owner's account, portfolio or transaction
    exactly as if it did not exist."""
    if owner is None:
        return
    engine, match = _engine(request), request.match_info
    if scope == permissions.ACCOUNT:
        await _own_account(engine, match["account_id"], owner)
    elif scope == permissions.PORTFOLIO:
        portfolio = await engine.portfolio_record(match["portfolio_id"])
        if portfolio.owner != owner:
            raise NotFound("no such portfolio", {"portfolio_id": match["portfolio_id"]})
    elif scope == permissions.TRANSACTION:
        transaction = await engine.get_transaction(match["transaction_id"])
        account = await engine.get_account(transaction.account_id)
        if account.owner != owner:
            raise NotFound("no such transaction", {"transaction_id": match["transaction_id"]})


async def _own_account(engine: Engine, account_id: str, owner: str) -> None:
    account = await engine.get_account(account_id)
    if account.owner != owner:
        raise NotFound("no such account", {"account_id": account_id})


def scoped_owner(request: web.Request) -> str | None:
    principal = request.get(PRINCIPAL)
    return principal.owner if principal is not None else None


def require_body_owner(request: web.Request, owner: str) -> None:
    scope = scoped_owner(request)
    if scope is not None and owner != scope:
        raise HttpError(403, "forbidden", "this token acts only for its own owner", {"field": "owner"})


def require_admin_for_override(request: web.Request, reason: str | None) -> None:
    principal = request.get(PRINCIPAL)
    if reason is not None and (principal is None or principal.role != permissions.ADMIN):
        raise HttpError(403, "forbidden", "only an admin may override the withdrawal rule",
                        {"field": "override_reason"})


async def _audit_outcome(request: web.Request, response: web.StreamResponse) -> None:
    """Records what no commit recorded: refused access (401, 403) on any route, and the
    outcome of a mutation that committed nothing (a refusal, a validation error, an
    idempotent replay, a failure). A rate-limited request (429) is not recorded: that
    would let a flood write the log."""
    context = request.get(AUDIT)
    if context is None or context.recorded:
        return
    status = response.status
    method, path = _route_key(request)
    changes = method in MUTATING_METHODS and (method, path) not in NOT_CHANGES
    if status == 429 or not (status in (401, 403) or changes):
        return
    code = request.get(ERROR_CODE) or ("replayed" if context.replayed else "no_change")
    target = next(iter(request.match_info.values()), None) if request.match_info else None
    # Queued, never awaited: the reply does not wait for the audit log (issue 14).
    _engine(request).security.record_later(context, f"{method} {path}", target, f"{status} {code}".strip())


# -- request helpers ---------------------------------------------------------------------
_decoders: dict[type, msgspec.json.Decoder] = {}


async def body_of(request: web.Request, request_type: type) -> Any:
    """Decodes the JSON body into `request_type`: 415 when not JSON, 400 when malformed,
    422 (with the field) when the shape or a value is wrong, 413 when too large."""
    declared = request.content_length
    body_max = request.app[SETTINGS].server.body_max_bytes
    if declared is not None and declared > body_max:
        raise web.HTTPRequestEntityTooLarge(max_size=body_max, actual_size=declared)
    if request.content.is_eof():
        # All of it has arrived (the usual case): taken as it lies, without `read()`'s
        # loop of awaits (the body is read once, here).
        raw = request.content.read_nowait()
        if len(raw) > body_max:
            raise web.HTTPRequestEntityTooLarge(max_size=body_max, actual_size=len(raw))
    else:
        try:
            async with asyncio.timeout(request.app[GUARD].body_read_timeout_s):
                raw = await request.read()
        except TimeoutError:
            raise HttpError(408, "request_timeout", "the request body did not arrive in time") from None
    if not raw.strip():
        raw = b"{}" if request_type in EMPTY_BODY_OK else raw
    elif request.content_type != JSON:
        raise HttpError(415, "unsupported_media_type", "send the body as application/json")
    decoder = _decoders.get(request_type)
    if decoder is None:
        decoder = _decoders[request_type] = msgspec.json.Decoder(request_type)
    try:
        body = decoder.decode(raw)
    except msgspec.ValidationError as error:
        raise HttpError(422, "validation_failed", str(error), _validation_details(error)) from None
    except msgspec.DecodeError as error:
        raise HttpError(400, "malformed_json", f"the body is not valid JSON: {_decode_reason(error, raw)}") from None
    except UnicodeDecodeError:
        raise HttpError(400, "malformed_json", "the body is not valid UTF-8") from None
    repeated = hardening.duplicate_name(raw)
    if repeated is not None:
        raise HttpError(400, "malformed_json", "the body repeats a member name; send each once",
                        {"field": repeated[:limits.NAME_LENGTH_MAX]})
    return body


# A `\uD800`-`\uDBFF` escape (the first half of a UTF-16 surrogate pair) that is an
# escape (an even number of backslashes before it) and is not followed by the second half.
_LONE_HIGH_SURROGATE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _decode_reason(error: msgspec.DecodeError, raw: bytes) -> str:
    """msgspec's reason, except where it misleads: a lone high surrogate escape
    (`"\ud800"`) in a complete body is reported as "Input data was truncated"."""
    reason = str(error)
    if reason == "Input data was truncated" and raw.rstrip().endswith((b"}", b"]")) \
            and _LONE_HIGH_SURROGATE.search(raw):
        return "a \\u escape is half of a UTF-16 surrogate pair (send the pair, or the character as UTF-8)"
    return reason


class NoBody(msgspec.Struct, forbid_unknown_fields=True):
    pass


EMPTY_BODY_OK = {NoBody, UpdateAccountRequest, ForkRequest}


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if len(request.headers.getall("Idempotency-Key")) > 1:
        # Two keys in one request: using either would make a retry carrying the other a
        # second operation (as a repeated JSON member is refused, so is this).
        raise HttpError(422, "validation_failed", "send one Idempotency-Key header, not several",
                        {"field": "Idempotency-Key"})
    # An empty or blank key is a mistake, not "no key" (two such deposits would both post);
    # a key is printable ASCII, so that it is the same key in every client, log and store.
    if not text.idempotency_key_valid(key, limits.IDEMPOTENCY_KEY_LENGTH_MAX):
        raise HttpError(422, "validation_failed",
                        "Idempotency-Key must be 1 to 200 printable ASCII characters, not blank",
                        {"field": "Idempotency-Key"})
    return key


def query_int(request: web.Request, name: str, default: int, maximum_digits: int = 6) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > maximum_digits:
        raise HttpError(422, "validation_failed", f"{name} must be a positive integer", {"field": name})
    return int(value)


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=views.encode(value), content_type=JSON)


# -- handlers ----------------------------------------------------------------------------
def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE]


def _account(request: web.Request, account) -> views.AccountView:
    return views.account_view(account, _engine(request).rules)


async def create_account(request: web.Request) -> web.Response:
    body = await body_of(request, CreateAccountRequest)
    require_body_owner(request, body.owner)
    account = await _engine(request).create_account(name=body.name, type=body.type, owner=body.owner,
                                                    opened_on=body.opened_on,
                                                    idempotency_key=idempotency_key(request))
    return json_response(_account(request, account), 201)


def owner_filter(request: web.Request) -> str | None:
    """The `owner` query parameter in the normal form owners are stored in (so "ａｎｎ" and
    " ann" find ann's accounts); 422 for a value no owner can have."""
    try:
        return normalized_owner(request.query.get("owner"))
    except ValueError as error:
        raise HttpError(422, "validation_failed", str(error).split(" - at ", 1)[0], {"field": "owner"}) from None


async def list_accounts(request: web.Request) -> web.Response:
    query = request.query
    owner, scope = owner_filter(request), scoped_owner(request)
    if scope is not None:
        if owner is not None and owner != scope:
            return json_response(views.AccountPage(items=[], next_cursor=None))
        owner = scope
    page = await _engine(request).list_accounts(
        limit=query_int(request, "limit", limits.PAGE_SIZE_DEFAULT), cursor=query.get("cursor"),
        type=query.get("type"), status=query.get("status"), owner=owner,
        portfolio_id=query.get("portfolio_id"))
    return json_response(views.AccountPage(items=[_account(request, a) for a in page.items],
                                           next_cursor=page.next_cursor))


async def get_account(request: web.Request) -> web.Response:
    account = await _engine(request).get_account(request.match_info["account_id"])
    return json_response(_account(request, account))


async def update_account(request: web.Request) -> web.Response:
    body = await body_of(request, UpdateAccountRequest)
    account = await _engine(request).update_account(request.match_info["account_id"], name=body.name,
                                                    status=body.status, idempotency_key=idempotency_key(request))
    return json_response(_account(request, account))


async def close_account(request: web.Request) -> web.Response:
    await body_of(request, NoBody)
    account = await _engine(request).close_account(request.match_info["account_id"],
                                                   idempotency_key=idempotency_key(request))
    return json_response(_account(request, account))


async def deposit(request: web.Request) -> web.Response:
    body = await body_of(request, DepositRequest)
    result = await _engine(request).deposit_request(request.match_info["account_id"], body,
                                                    idempotency_key=idempotency_key(request))
    return json_response(result, 201)


async def withdraw(request: web.Request) -> web.Response:
    body = await body_of(request, WithdrawalRequest)
    require_admin_for_override(request, body.override_reason)
    result = await _engine(request).withdraw_request(request.match_info["account_id"], body,
                                                     idempotency_key=idempotency_key(request))
    return json_response(result, 201)


async def book_trade(request: web.Request) -> web.Response:
    body = await body_of(request, TradeRequest)
    result = await _engine(request).book_trade_request(request.match_info["account_id"], body,
                                                       idempotency_key=idempotency_key(request))
    return json_response(result, 201)


async def list_transactions(request: web.Request) -> web.Response:
    cursor = request.query.get("cursor")
    if cursor is not None and not (cursor.isascii() and cursor.isdigit()):  # str.isdigit() takes "²"
        raise HttpError(422, "validation_failed", "malformed cursor", {"field": "cursor"})
    page = await _engine(request).list_transactions(
        request.match_info["account_id"], limit=query_int(request, "limit", limits.PAGE_SIZE_DEFAULT),
        cursor=cursor)
    return json_response(views.TransactionPage(items=page.items, next_cursor=page.next_cursor))


async def transfer(request: web.Request) -> web.Response:
    body = await body_of(request, TransferRequest)
    require_admin_for_override(request, body.override_reason)
    scope = scoped_owner(request)
    if scope is not None:
        for account_id in (body.from_account, body.to_account):
            await _own_account(_engine(request), account_id, scope)
    result = await _engine(request).transfer_request(body, idempotency_key=idempotency_key(request))
    return json_response(result, 201)


async def get_transaction(request: web.Request) -> web.Response:
    return json_response(await _engine(request).get_transaction(request.match_info["transaction_id"]))


async def create_portfolio(request: web.Request) -> web.Response:
    body = await body_of(request, CreatePortfolioRequest)
    require_body_owner(request, body.owner)
    portfolio = await _engine(request).create_portfolio(name=body.name, owner=body.owner,
                                                        initial_capital=body.initial_capital,
                                                        opened_on=body.opened_on,
                                                        idempotency_key=idempotency_key(request))
    return json_response(portfolio, 201)


async def get_portfolio(request: web.Request) -> web.Response:
    return json_response(await _engine(request).get_portfolio(request.match_info["portfolio_id"]))


async def portfolio_tree(request: web.Request) -> web.Response:
    return json_response(await _engine(request).portfolio_tree(request.match_info["portfolio_id"]))


async def merge_portfolio(request: web.Request) -> web.Response:
    await body_of(request, NoBody)
    result = await _engine(request).merge_portfolio(request.match_info["portfolio_id"],
                                                    idempotency_key=idempotency_key(request))
    return json_response(result, 201)


async def reinvest_portfolio(request: web.Request) -> web.Response:
    body = await body_of(request, ReinvestRequest)
    result = await _engine(request).reinvest_portfolio(request.match_info["portfolio_id"], body.quarter,
                                                       idempotency_key=idempotency_key(request))
    return json_response(result)


async def fork(request: web.Request) -> web.Response:
    body = await body_of(request, ForkRequest)
    result = await _engine(request).fork(request.match_info["account_id"], amount=body.amount,
                                         idempotency_key=idempotency_key(request))
    return json_response(result, 201)


async def project(request: web.Request) -> web.Response:
    body = await body_of(request, ProjectionRequest)
    fields = msgspec.structs.asdict(body)
    fields["weekly_return_bps"] = msgspec.structs.asdict(body.weekly_return_bps)
    fields = {name: value for name, value in fields.items() if value is not None}
    return json_response(await _engine(request).project(**fields))


def _weeks(request: web.Request) -> int | None:
    if "weeks" not in request.query:
        return None
    weeks = query_int(request, "weeks", 0)
    if not 1 <= weeks <= limits.ANALYTICS_WEEKS_MAX:
        raise HttpError(422, "validation_failed", f"weeks must be 1 to {limits.ANALYTICS_WEEKS_MAX}",
                        {"field": "weeks"})
    return weeks


async def account_analytics(request: web.Request) -> web.Response:
    return json_response(await _engine(request).account_analytics(request.match_info["account_id"],
                                                                   weeks=_weeks(request)))


async def portfolio_analytics(request: web.Request) -> web.Response:
    return json_response(await _engine(request).portfolio_analytics(request.match_info["portfolio_id"],
                                                                     weeks=_weeks(request)))


async def list_events(request: web.Request) -> web.Response:
    # `cursor` / `next_cursor` as on every list; `after` / `next_after` stay as aliases.
    after = query_int(request, "cursor" if "cursor" in request.query else "after", 0, maximum_digits=18)
    items = await _engine(request).events_page(after=after, limit=query_int(request, "limit",
                                                                           limits.PAGE_SIZE_DEFAULT),
                                               owner=scoped_owner(request))
    next_after = items[-1].seq if items else after
    return json_response(views.EventPage(items=items, next_after=next_after, next_cursor=str(next_after)))


async def supervisor_status(request: web.Request) -> web.Response:
    return json_response(await _engine(request).supervisor_status())


async def inject_fault(request: web.Request) -> web.Response:
    engine = _engine(request)
    if not engine.settings.engine.fault_injection:
        raise HttpError(404, "not_found", "no such route")
    body = await body_of(request, FaultRequest)
    return json_response(await engine.inject_fault(body.account_id), 202)


async def release_quarantine(request: web.Request) -> web.Response:
    _engine(request).release_quarantine(request.match_info["account_id"])
    return json_response(_account(request, await _engine(request).get_account(request.match_info["account_id"])))


async def create_token(request: web.Request) -> web.Response:
    body = await body_of(request, CreateTokenRequest)
    created = await _engine(request).security.create_token(name=body.name, role=body.role, owner=body.owner,
                                                           context=request[AUDIT],
                                                           idempotency_key=idempotency_key(request))
    return json_response(created, 201)


async def list_tokens(request: web.Request) -> web.Response:
    return json_response(views.TokenPage(items=await _engine(request).security.list_tokens()))


async def revoke_token(request: web.Request) -> web.Response:
    token_id = request.match_info["token_id"]
    if not 1 <= len(token_id) <= limits.ID_LENGTH_MAX:
        raise HttpError(404, "not_found", "no such token", {"token_id": token_id[:limits.ID_LENGTH_MAX]})
    revoked = await _engine(request).security.revoke_token(token_id, context=request[AUDIT])
    request.app[GUARD].buckets.forget(token_id)
    return json_response(revoked)


async def list_audit(request: web.Request) -> web.Response:
    cursor = query_int(request, "cursor", 0, maximum_digits=18)
    limit = query_int(request, "limit", limits.PAGE_SIZE_DEFAULT)
    if not 1 <= limit <= limits.AUDIT_PAGE_SIZE_MAX:
        raise HttpError(422, "validation_failed", f"limit must be 1 to {limits.AUDIT_PAGE_SIZE_MAX}",
                        {"field": "limit"})
    items = await _engine(request).security.audit_page(after=cursor, limit=limit + 1)
    next_cursor = str(items[limit - 1].seq) if len(items) > limit else None
    return json_response(views.AuditPage(items=[views.audit_view(item) for item in items[:limit]],
                                         next_cursor=next_cursor))


async def verify_audit(request: web.Request) -> web.Response:
    return json_response(await _engine(request).security.verify_audit())


async def whoami(request: web.Request) -> web.Response:
    return json_response(request[PRINCIPAL])


async def health(request: web.Request) -> web.Response:
    """Liveness: the process can serve (it answers, and the tasks that bring everything
    else back by themselves still run). A database outage is not a liveness failure: a
    restart would not help, the engine recovers by itself."""
    availability = _engine(request).availability
    if availability.alive():
        return json_response(views.HealthView(status="ok"))
    return error_response(request, 503, "unhealthy", "a supervising task of the engine has stopped; restart it",
                          availability.describe())


async def ready(request: web.Request) -> web.Response:
    """Readiness: writes can commit now. Answered from the supervisor's state, at once."""
    engine = _engine(request)
    if await engine.check_ready():
        return json_response(views.HealthView(status="ready"))
    details = engine.availability.describe()
    code = "storage_full" if details["state"] == "storage_full" else "not_ready"
    return error_response(request, 503, code, READY_REFUSALS.get(details["state"], READY_REFUSALS["starting"]),
                          details, headers={"Retry-After": RETRY_AFTER_S})


READY_REFUSALS = {
    "starting": "the engine is starting",
    "available": "the database has not answered lately, or the writer is reconnecting",
    "standby": "this engine is a standby: another engine writes",
    "database_unavailable": "the database is unavailable; the engine is bringing it back",
    "storage_full": "the database's disk is full; writes resume by themselves once space is freed",
    "not_primary": "another engine took the writer lock; this one waits as a standby",
    "stopped": "the engine is stopping",
}


async def metrics(request: web.Request) -> web.Response:
    _require_metrics_token(request)
    body = generate_latest(_engine(request).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _require_metrics_token(request: web.Request) -> None:
    """With `server.metrics_token` set, /metrics needs it as a bearer token."""
    wanted = request.app[SETTINGS].server.metrics_token
    if not wanted:
        return
    token = _bearer_token(request)
    if token is None or not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), wanted.encode()):
        raise HttpError(401, "unauthorized", "/metrics needs the metrics token (server.metrics_token)")


async def openapi(request: web.Request) -> web.Response:
    from gateway.openapi import document
    return json_response(document())


# -- webhooks (issue 11; admin; a scoped token manages only its owner's endpoints) ------
def _webhook_id(request: web.Request) -> str:
    return request.match_info["webhook_id"]


async def create_webhook(request: web.Request) -> web.Response:
    body = await body_of(request, CreateWebhookRequest)
    if body.owner is not None:
        require_body_owner(request, body.owner)
    created = await _engine(request).webhooks.create(
        url=body.url, event_types=body.event_types, description=body.description, owner=body.owner,
        scope=scoped_owner(request), context=request[AUDIT], idempotency_key=idempotency_key(request))
    return json_response(created, 201)


async def list_webhooks(request: web.Request) -> web.Response:
    return json_response(_engine(request).webhooks.list(scope=scoped_owner(request)))


async def get_webhook(request: web.Request) -> web.Response:
    return json_response(_engine(request).webhooks.get(_webhook_id(request), scope=scoped_owner(request)))


async def update_webhook(request: web.Request) -> web.Response:
    body = await body_of(request, UpdateWebhookRequest)
    updated = await _engine(request).webhooks.update(
        _webhook_id(request), url=body.url, event_types=body.event_types, description=body.description,
        enabled=body.enabled, scope=scoped_owner(request), context=request[AUDIT])
    return json_response(updated)


async def delete_webhook(request: web.Request) -> web.Response:
    return json_response(await _engine(request).webhooks.delete(_webhook_id(request), scope=scoped_owner(request),
                                                                context=request[AUDIT]))


async def rotate_webhook_secret(request: web.Request) -> web.Response:
    return json_response(await _engine(request).webhooks.rotate_secret(
        _webhook_id(request), scope=scoped_owner(request), context=request[AUDIT]))


async def list_webhook_attempts(request: web.Request) -> web.Response:
    return json_response(await _engine(request).webhooks.attempts(
        _webhook_id(request), after=query_int(request, "cursor", 0, maximum_digits=18),
        limit=query_int(request, "limit", limits.PAGE_SIZE_DEFAULT), scope=scoped_owner(request)))


async def list_dead_letters(request: web.Request) -> web.Response:
    return json_response(await _engine(request).webhooks.dead_letters(
        _webhook_id(request), after=query_int(request, "cursor", 0, maximum_digits=18),
        limit=query_int(request, "limit", limits.PAGE_SIZE_DEFAULT), scope=scoped_owner(request)))


async def retry_dead_letters(request: web.Request) -> web.Response:
    return json_response(await _engine(request).webhooks.redeliver(
        _webhook_id(request), scope=scoped_owner(request), context=request[AUDIT]), 202)


async def retry_dead_letter(request: web.Request) -> web.Response:
    raw = request.match_info["event_seq"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise HttpError(404, "not_found", "no such dead letter", {"event_seq": raw[:20]})
    return json_response(await _engine(request).webhooks.redeliver(
        _webhook_id(request), int(raw), scope=scoped_owner(request), context=request[AUDIT]), 202)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    request: type | None = None
    response: type | None = None
    status: int = 200
    authenticated: bool = True


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/accounts", create_account, "Create a standalone account (balance 0)",
          CreateAccountRequest, views.AccountView, 201),
    Route("GET", "/v1/accounts", list_accounts, "List accounts (filters: type, status, owner, portfolio_id; "
          "cursor pagination)", None, views.AccountPage),
    Route("GET", "/v1/accounts/{account_id}", get_account, "One account (committed state)", None,
          views.AccountView),
    Route("PATCH", "/v1/accounts/{account_id}", update_account, "Rename and/or freeze/unfreeze",
          UpdateAccountRequest, views.AccountView),
    Route("POST", "/v1/accounts/{account_id}/close", close_account, "Close an account with a zero balance",
          None, views.AccountView),
    Route("POST", "/v1/accounts/{account_id}/deposits", deposit, "Deposit", DepositRequest,
          Transaction, 201),
    Route("POST", "/v1/accounts/{account_id}/withdrawals", withdraw, "Withdraw", WithdrawalRequest,
          Transaction, 201),
    Route("POST", "/v1/accounts/{account_id}/trades", book_trade, "Book a trade result (premium, loss, fee)",
          TradeRequest, Transaction, 201),
    Route("GET", "/v1/accounts/{account_id}/transactions", list_transactions,
          "Transaction history, newest first, with balance_after", None, views.TransactionPage),
    Route("POST", "/v1/transfers", transfer, "Transfer between two accounts; both legs commit atomically",
          TransferRequest, Transfer, 201),
    Route("GET", "/v1/transactions/{transaction_id}", get_transaction, "One transaction (a ledger entry)", None,
          Transaction),
    Route("POST", "/v1/portfolios", create_portfolio, "Create a root portfolio: capital split 40/30/30 into "
          "Gen-Acc, Rev-Acc, Com-Acc", CreatePortfolioRequest, PortfolioView, 201),
    Route("GET", "/v1/portfolios/{portfolio_id}", get_portfolio, "A portfolio: accounts, child units, totals", None,
          PortfolioView),
    Route("GET", "/v1/portfolios/{portfolio_id}/tree", portfolio_tree, "The whole fork tree below a portfolio", None,
          PortfolioTree),
    Route("POST", "/v1/portfolios/{portfolio_id}/merge", merge_portfolio, "Merge a forked unit now", None,
          GrowthOperation, 201),
    Route("POST", "/v1/portfolios/{portfolio_id}/reinvest", reinvest_portfolio,
          "Quarterly reinvestment of the portfolio's Rev-Acc and Com-Accs (75% contracts, 25% LEAPS)",
          ReinvestRequest, Reinvestment),
    Route("POST", "/v1/accounts/{account_id}/fork", fork, "Manual fork of a portfolio Gen-Acc (amount <= surplus)",
          ForkRequest, GrowthOperation, 201),
    Route("GET", "/v1/accounts/{account_id}/analytics", account_analytics,
          "Performance, risk, trend and forecast of an account (?weeks=N window)", None, AccountAnalytics),
    Route("GET", "/v1/portfolios/{portfolio_id}/analytics", portfolio_analytics,
          "The same for a portfolio and its units, with the fork tree's growth (?weeks=N)", None,
          PortfolioAnalytics),
    Route("POST", "/v1/projections", project, "Project a portfolio week by week with the live rules",
          ProjectionRequest, Projection),
    Route("GET", "/v1/events", list_events, "The event feed, in commit order (?after=seq&limit)", None,
          views.EventPage),
    Route("GET", "/v1/supervisor/status", supervisor_status, "The supervision tree: accounts, restarts, "
          "quarantines, mailbox depths"),
    Route("POST", "/v1/admin/faults", inject_fault, "Tests only (ALLUSE_FAULT_INJECTION=1): crash an account's "
          "actor on its next message", FaultRequest, views.FaultArmed, 202),
    Route("POST", "/v1/admin/quarantine/{account_id}/release", release_quarantine,
          "Let a quarantined account work again", None, views.AccountView),
    Route("POST", "/v1/tokens", create_token, "Create an API token (admin); its secret is shown only in this "
          "answer and stored only as a hash", CreateTokenRequest, CreatedToken, 201),
    Route("GET", "/v1/tokens", list_tokens, "Every API token, revoked ones too (never their secrets)", None,
          views.TokenPage),
    Route("DELETE", "/v1/tokens/{token_id}", revoke_token, "Revoke an API token; it fails at once", None,
          TokenInfo),
    Route("GET", "/v1/audit", list_audit, "The audit log, oldest first (?cursor=seq&limit)", None,
          views.AuditPage),
    Route("GET", "/v1/audit/verify", verify_audit, "Recompute the audit log's hash chain", None,
          AuditVerification),
    Route("GET", "/v1/whoami", whoami, "The principal of the presented token", None, Principal),
    Route("POST", "/v1/webhooks", create_webhook, "Register a webhook endpoint (admin); its signing secret is "
          "shown only in this answer", CreateWebhookRequest, webhook_views.CreatedWebhook, 201),
    Route("GET", "/v1/webhooks", list_webhooks, "Every webhook endpoint (never their secrets)", None,
          webhook_views.WebhookPage),
    Route("GET", "/v1/webhooks/{webhook_id}", get_webhook, "One webhook endpoint", None, webhook_views.WebhookView),
    Route("PATCH", "/v1/webhooks/{webhook_id}", update_webhook, "Change a webhook's URL, event types, "
          "description, or enable/disable it", UpdateWebhookRequest, webhook_views.WebhookView),
    Route("DELETE", "/v1/webhooks/{webhook_id}", delete_webhook, "Delete a webhook endpoint", None,
          webhook_views.WebhookView),
    Route("POST", "/v1/webhooks/{webhook_id}/rotate-secret", rotate_webhook_secret, "A new signing secret (shown "
          "only here); the previous one keeps signing alongside it for the grace period", None,
          webhook_views.RotatedSecret),
    Route("GET", "/v1/webhooks/{webhook_id}/attempts", list_webhook_attempts, "Every delivery attempt, oldest "
          "first (?cursor&limit)", None, webhook_views.AttemptPage),
    Route("GET", "/v1/webhooks/{webhook_id}/dead-letters", list_dead_letters, "Events that exhausted their retry "
          "schedule (?cursor&limit)", None, webhook_views.DeadLetterPage),
    Route("POST", "/v1/webhooks/{webhook_id}/dead-letters/retry", retry_dead_letters, "Redeliver every dead "
          "letter of the endpoint", None, webhook_views.Redelivery, 202),
    Route("POST", "/v1/webhooks/{webhook_id}/dead-letters/{event_seq}/retry", retry_dead_letter,
          "Redeliver one dead letter", None, webhook_views.Redelivery, 202),
    Route("GET", "/health", health, "Liveness", None, views.HealthView, authenticated=False),
    Route("GET", "/ready", ready, "Readiness: recovery done and the database reachable", None, views.HealthView,
          authenticated=False),
    Route("GET", "/metrics", metrics, "Prometheus metrics (text exposition format)", authenticated=False),
    Route("GET", "/openapi.json", openapi, "This API description (OpenAPI 3.1)", authenticated=False),
)

# The conveniences of issue 12 (portfolio list, operation lookups) live in their own module.
from gateway import conveniences  # noqa: E402  (it imports the helpers above)

ROUTES = ROUTES + conveniences.ROUTES


# Every /v1 route has exactly one decision in the permission table, and no decision
# names a route that does not exist.
assert {(r.method, r.path) for r in ROUTES if r.path.startswith("/v1/")} == set(permissions.PERMISSIONS), \
    "gateway.permissions.PERMISSIONS must cover exactly the /v1 routes"


class HttpMetrics:
    def __init__(self, registry) -> None:
        self.requests = Counter("alluse_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=registry)
        self.latency = Histogram("alluse_http_request_seconds", "HTTP request latency", ["method", "route"],
                                 buckets=LATENCY_BUCKETS_S, registry=registry)
        # Each label set's children, found once (`labels()` takes a lock and builds its key
        # on every call). Routes are the table's, statuses a few dozen: bounded.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(method, route, str(status)),
                                              self.latency.labels(method, route))
        children[0].inc()
        children[1].observe(seconds)


def server_options(settings: Settings) -> dict:
    """The request handler's limits (aiohttp answers past them, in our error shape)."""
    security = settings.security
    return {"max_line_size": security.header_line_bytes_max, "max_field_size": security.header_field_bytes_max,
            "max_headers": security.headers_max, "keepalive_timeout": security.keepalive_timeout_s}


async def _start_in_background(engine: Engine) -> None:
    try:
        await engine.start()
    except asyncio.CancelledError:
        raise
    except BaseException:
        log.critical("the standby could not start; stopping", exc_info=True)
        signal.raise_signal(signal.SIGTERM)


def create_app(settings: Settings, engine: Engine | None = None) -> web.Application:
    """The whole service as an aiohttp app. With no `engine`, the app starts and stops
    its own (in `cleanup_ctx`); tests may pass one they manage."""
    protocol.install()
    from gateway import console, cors, docs

    app = web.Application(middlewares=[cors.middleware, errors_middleware, auth_middleware],
                          client_max_size=settings.server.body_max_bytes)
    own_engine = engine is None
    engine = engine or Engine(settings)
    app[SETTINGS] = settings
    app[ENGINE] = engine
    app[ADMIN_TOKEN] = settings.server.admin_token or secrets.token_urlsafe(32)
    app[HTTP_METRICS] = HttpMetrics(engine.metrics.registry)
    health_metrics.register(engine)
    app[GUARD] = Guard(settings)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    docs.setup(app)
    console.setup(app)

    async def engine_context(app: web.Application):
        starting = None
        if own_engine:
            if settings.engine.standby:
                # A standby serves /health and /ready (503) while it waits for the lock.
                starting = asyncio.create_task(_start_in_background(engine), name="alluse-standby")
            else:
                await engine.start()
        yield
        if own_engine:
            if starting is not None and not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            await engine.stop()

    app.cleanup_ctx.append(engine_context)
    return app
