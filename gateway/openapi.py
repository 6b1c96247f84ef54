"""/openapi.json, generated from the route table and the same msgspec Structs that
validate requests, so the description cannot drift from the code."""
from __future__ import annotations

import functools
import typing
from http import HTTPStatus

import msgspec

from engine import limits
from engine.model import AccountStatus, AccountType
from gateway import views
from gateway.api_reference import DOCS

REF = "#/components/schemas/{name}"
INFO = ("The account books of ALL-USE portfolios. Amounts are integers in cents (1 to 10^15). Every /v1 route "
        "needs `Authorization: Bearer <token>` (use **Authorize** above); what a token may call follows its role "
        "and owner scope. Errors are always `{\"error\": {\"code\", \"message\", \"details\"}, "
        "\"request_id\"}`; each response below names the codes it can carry. Mutations accept an "
        "`Idempotency-Key` (1 to 200 characters, not blank). Lists page with `cursor` / `next_cursor`.")

ERROR_STATUSES = {
    "400": "Malformed JSON", "401": "Missing or invalid token",
    "403": "The token's role, or its owner scope, forbids this", "404": "Unknown id or route",
    "409": "A rule refuses (insufficient_funds, account_not_active, withdrawal_not_allowed, "
           "account_not_empty, balance_limit_exceeded, fork_not_allowed, merge_not_allowed, already_reinvested, "
           "reinvest_not_allowed, quarter_before_opening, idempotency_key_reused, webhook_limit_reached)",
    "413": "Body too large", "415": "Body is not application/json", "422": "Validation failed (details.field)",
    "429": "Rate limited, or too many invalid tokens from this address (Retry-After)",
    "503": "Overloaded or database unavailable (Retry-After)",
}
# Only routes that read a body can time out reading it.
BODY_STATUSES = {"408": "The request body did not arrive in time"}

# Mutations that honour an Idempotency-Key; the others ignore the header.
IDEMPOTENT = frozenset({"create_account", "update_account", "close_account", "deposit", "withdraw", "book_trade",
                        "transfer", "create_portfolio", "merge_portfolio", "reinvest_portfolio", "fork",
                        "create_token", "create_webhook"})

_LIMIT = {"type": "integer", "minimum": 1, "maximum": limits.PAGE_SIZE_MAX}
_SEQUENCE = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}
_WEEKS = {"type": "integer", "minimum": 1, "maximum": limits.ANALYTICS_WEEKS_MAX}
_ID = {"type": "string", "minLength": 1, "maxLength": limits.ID_LENGTH_MAX}
# The query parameters each handler reads (all optional), as the gateway checks them.
QUERY: dict[str, dict[str, dict]] = {
    "list_accounts": {"type": {"enum": list(typing.get_args(AccountType))},
                      "status": {"enum": list(typing.get_args(AccountStatus))},
                      "owner": {"type": "string", "minLength": 1, "maxLength": limits.OWNER_LENGTH_MAX},
                      "portfolio_id": _ID, "limit": _LIMIT, "cursor": _ID},
    "list_transactions": {"limit": _LIMIT, "cursor": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
    "list_events": {"cursor": _SEQUENCE, "after": _SEQUENCE, "limit": _LIMIT},
    "list_portfolios": {"owner": {"type": "string", "minLength": 1, "maxLength": limits.OWNER_LENGTH_MAX},
                        "limit": _LIMIT, "cursor": _ID},
    "list_audit": {"cursor": _SEQUENCE, "limit": {**_LIMIT, "maximum": limits.AUDIT_PAGE_SIZE_MAX}},
    "list_webhook_attempts": {"cursor": _SEQUENCE, "limit": _LIMIT},
    "list_dead_letters": {"cursor": _SEQUENCE, "limit": _LIMIT},
    "account_analytics": {"weeks": _WEEKS},
    "portfolio_analytics": {"weeks": _WEEKS},
}


TAGS = (("/v1/accounts", "Accounts"), ("/v1/transactions", "Accounts"), ("/v1/transfers", "Accounts"),
        ("/v1/portfolios", "Portfolios and growth"), ("/v1/forks", "Portfolios and growth"),
        ("/v1/merges", "Portfolios and growth"), ("/v1/projections", "Portfolios and growth"),
        ("/v1/events", "Events"), ("/v1/supervisor", "Operations"), ("/v1/admin", "Operations"),
        ("/v1/tokens", "Security"), ("/v1/audit", "Security"), ("/v1/whoami", "Security"))
# The codes each status carries on every route that can answer it.
COMMON_CODES = {"400": ["malformed_json", "bad_request"], "401": ["unauthorized"], "403": ["forbidden"],
                "404": ["not_found"], "408": ["request_timeout"], "413": ["payload_too_large"],
                "415": ["unsupported_media_type"], "422": ["validation_failed"],
                "429": ["rate_limited", "too_many_invalid_tokens"]}


def _tag(path: str) -> str:
    if path.endswith("/analytics"):
        return "Analytics"
    return next((tag for prefix, tag in TAGS if path.startswith(prefix)), "Service")


def _error_description(status: str, description: str, route, doc) -> str:
    if status == "409":
        codes = doc.conflicts
    elif status == "503":
        codes = doc.unavailable if route.authenticated else ["not_ready"] if route.path == "/ready" else []
    else:
        codes = COMMON_CODES.get(status, [])
    if status == "409":
        description = "A rule refuses"
        if not codes:
            return "A rule refuses (not expected on this route)"
    return f"{description}. error.code: {', '.join(f'`{c}`' for c in codes)}" if codes else description


@functools.cache
def document() -> dict:
    from gateway.app import ROUTES

    types = {views.ErrorResponse}
    for route in ROUTES:
        types.update(t for t in (route.request, route.response) if t is not None)
    ordered = sorted(types, key=lambda t: t.__name__)
    schemas, components = msgspec.json.schema_components(ordered, ref_template=REF)
    refs = dict(zip(ordered, schemas))
    paths: dict = {}
    for route in ROUTES:
        doc = DOCS[route.handler.__name__]
        operation: dict = {"summary": route.summary, "description": doc.description,
                           "operationId": route.handler.__name__, "tags": [_tag(route.path)], "responses": {}}
        parameters = [{"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
                      for part in route.path.split("/") if part.startswith("{")]
        if route.handler.__name__ in IDEMPOTENT:
            parameters.append({"name": "Idempotency-Key", "in": "header", "required": False,
                               "schema": {"type": "string", "minLength": 1,
                                          "maxLength": limits.IDEMPOTENCY_KEY_LENGTH_MAX}})
        parameters += [{"name": name, "in": "query", "required": False, "schema": schema}
                       for name, schema in QUERY.get(route.handler.__name__, {}).items()]
        if parameters:
            operation["parameters"] = parameters
        if route.request is not None:
            media = {"schema": refs[route.request]}
            if doc.example is not None:
                media["example"] = doc.example
            operation["requestBody"] = {"required": True, "content": {"application/json": media}}
        success: dict = {"description": HTTPStatus(route.status).phrase}  # 201 Created, 202 Accepted
        if route.response is not None:
            success["content"] = {"application/json": {"schema": refs[route.response]}}
        elif route.path == "/metrics":
            success["content"] = {"text/plain": {"schema": {"type": "string"}}}
        if route.handler.__name__ in IDEMPOTENT:
            success["headers"] = {"Idempotency-Replayed": {
                "description": "`true` when this answer replays an earlier request's result (same key)",
                "schema": {"type": "string", "enum": ["true"]}}}
        operation["responses"][str(route.status)] = success
        error = {"content": {"application/json": {"schema": refs[views.ErrorResponse]}}}
        statuses = {**ERROR_STATUSES, **(BODY_STATUSES if route.method in ("POST", "PATCH") else {})}
        for status, description in sorted(statuses.items()):
            if route.authenticated or status == "503":
                operation["responses"][status] = {"description": _error_description(status, description, route,
                                                                                     doc), **error}
        if route.authenticated:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "ALL-USE Account Engine", "version": "1",
                 "description": INFO},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
