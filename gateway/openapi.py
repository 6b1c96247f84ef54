"""/openapi.json, generated from the route table and the same msgspec Structs that
validate requests, so the description cannot drift from the code."""
from __future__ import annotations

import functools

import msgspec

from gateway import views

REF = "#/components/schemas/{name}"

ERROR_STATUSES = {
    "400": "Malformed JSON", "401": "Missing or invalid token", "404": "Unknown id or route",
    "409": "A rule refuses (insufficient_funds, account_not_active, withdrawal_not_allowed, "
           "account_not_empty, balance_limit_exceeded, fork_not_allowed, merge_not_allowed, already_reinvested, "
           "reinvest_not_allowed, quarter_before_opening, idempotency_key_reused)",
    "413": "Body too large", "415": "Body is not application/json", "422": "Validation failed (details.field)",
    "429": "Rate limited, or too many invalid tokens from this address (Retry-After)",
    "503": "Overloaded or database unavailable (Retry-After)",
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
        if route.method in ("POST", "PATCH"):
            parameters.append({"name": "Idempotency-Key", "in": "header", "required": False,
                               "schema": {"type": "string", "maxLength": 200}})
        if route.handler.__name__.endswith("_analytics"):
            parameters.append({"name": "weeks", "in": "query", "required": False,
                               "schema": {"type": "integer", "minimum": 1, "maximum": 520}})
        if route.handler.__name__ == "list_events":
            parameters += [{"name": n, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}
                           for n in ("after", "limit")]
        elif route.handler.__name__.startswith("list_"):
            parameters += [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                           for n in ("limit", "cursor")]
        if route.handler.__name__ == "list_accounts":
            parameters += [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                           for n in ("type", "status", "owner", "portfolio_id")]
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
        for status, description in ERROR_STATUSES.items():
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
