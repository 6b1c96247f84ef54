"""The API conveniences of issue 12: list root portfolios, and read a transfer, fork or
merge by the id its reply carried. Thin handlers over `actors.lookups`; their routes join
`gateway.app.ROUTES` (and so the permission check, /openapi.json and the fuzzing)."""
from __future__ import annotations

from aiohttp import web

from actors import lookups
from engine import limits
from engine.errors import NotFound
from engine.model import GrowthOperation, Transfer
from gateway.app import Route, _engine, json_response, owner_filter, query_int, scoped_owner


async def list_portfolios(request: web.Request) -> web.Response:
    owner, scope = owner_filter(request), scoped_owner(request)
    if scope is not None:
        if owner is not None and owner != scope:
            return json_response(lookups.PortfolioPage(items=[], next_cursor=None))
        owner = scope
    page = await lookups.list_portfolios(_engine(request), limit=query_int(request, "limit", limits.PAGE_SIZE_DEFAULT),
                                         cursor=request.query.get("cursor"), owner=owner)
    return json_response(page)


async def _scoped(request: web.Request, operation, what: str):
    """An owner-scoped token meets another owner's operation as if it did not exist."""
    scope = scoped_owner(request)
    if scope is not None and await lookups.owners_of(_engine(request), operation.legs) != {scope}:
        raise NotFound(f"no such {what}", {"id": operation.id})
    return json_response(operation)


async def get_transfer(request: web.Request) -> web.Response:
    transfer = await lookups.get_transfer(_engine(request), request.match_info["transfer_id"])
    return await _scoped(request, transfer, "transfer")


async def get_fork(request: web.Request) -> web.Response:
    fork = await lookups.get_growth(_engine(request), request.match_info["fork_id"], "fork")
    return await _scoped(request, fork, "fork")


async def get_merge(request: web.Request) -> web.Response:
    merge = await lookups.get_growth(_engine(request), request.match_info["merge_id"], "merge")
    return await _scoped(request, merge, "merge")


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/portfolios", list_portfolios, "List root portfolios with their trees' totals "
          "(filter: owner; cursor pagination)", None, lookups.PortfolioPage),
    Route("GET", "/v1/transfers/{transfer_id}", get_transfer, "One transfer, by the id its reply carried", None,
          Transfer),
    Route("GET", "/v1/forks/{fork_id}", get_fork, "One fork (manual or automatic), by its id", None,
          GrowthOperation),
    Route("GET", "/v1/merges/{merge_id}", get_merge, "One merge (on demand or automatic), by its id", None,
          GrowthOperation),
)
