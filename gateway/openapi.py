"""/openapi.json, generated from the route table and the same msgspec Structs that
validate requests, so the description cannot drift from the code."""
from __future__ import annotations

import functools
import typing

import msgspec

from engine import limits
from engine.model import AccountStatus, AccountType
from gateway import views

REF = "#/components/schemas/{name}"

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
                        "transfer", "create_portfolio", "merge_portfolio", "reinvest_portfolio", "fork"})

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
    "list_events": {"after": _SEQUENCE, "limit": _LIMIT},
    "list_audit": {"cursor": _SEQUENCE, "limit": {**_LIMIT, "maximum": limits.AUDIT_PAGE_SIZE_MAX}},
    "list_webhook_attempts": {"cursor": _SEQUENCE, "limit": _LIMIT},
    "list_dead_letters": {"cursor": _SEQUENCE, "limit": _LIMIT},
    "account_analytics": {"weeks": _WEEKS},
    "portfolio_analytics": {"weeks": _WEEKS},
}


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
        operation: dict = {"summary": route.summary, "operationId": route.handler.__name__, "responses": {}}
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
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": refs[route.request]}}}
        success: dict = {"description": "OK"}
        if route.response is not None:
            success["content"] = {"application/json": {"schema": refs[route.response]}}
        elif route.path == "/metrics":
            success["content"] = {"text/plain": {"schema": {"type": "string"}}}
        operation["responses"][str(route.status)] = success
        error = {"content": {"application/json": {"schema": refs[views.ErrorResponse]}}}
        statuses = {**ERROR_STATUSES, **(BODY_STATUSES if route.method in ("POST", "PATCH") else {})}
        for status, description in sorted(statuses.items()):
            if route.authenticated or status == "503":
                operation["responses"][status] = {"description": description, **error}
        if route.authenticated:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "ALL-USE Account Engine", "version": "1",
                 "description": "Amounts are integers in cents. Every /v1 route needs a bearer token."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
