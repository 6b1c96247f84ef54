"""The console's pages: each reads the in-process `Engine` (what the API routes read) and
renders a template. Owner scope is applied here exactly as the API applies it: another
owner's portfolio or account is simply not found."""
from __future__ import annotations

import asyncio
import json
import secrets
from datetime import datetime
from pathlib import Path

import jinja2
import msgspec
from aiohttp import web

from actors import lookups
from engine import limits
from engine.audit import AuditContext, Principal
from engine.errors import EngineError, NotFound
from engine.requests import normalized_owner
from gateway import permissions
from gateway.console import drawing
from gateway.console.sessions import see_other

TRANSACTIONS_PER_PAGE = 20
CHART_ENTRIES_MAX = limits.PAGE_SIZE_MAX
EVENTS_SHOWN = 50
AUDIT_PER_PAGE = 50
SUPERVISORS_SHOWN = 50
WEBHOOK_ATTEMPTS_SHOWN = 50
DEAD_LETTERS_SHOWN = 100
STREAM_POLL_S = 0.5
STREAM_HEARTBEAT_S = 15.0
# A stream ends after this long; the browser reconnects with Last-Event-ID and resumes.
STREAM_LIFETIME_S = 300.0

NAV = (("portfolios", "Portfolios", "/console/portfolios", ("GET", "/v1/portfolios")),
       ("events", "Live events", "/console/events", ("GET", "/v1/events")),
       ("supervision", "Supervision", "/console/supervision", ("GET", "/v1/supervisor/status")),
       ("webhooks", "Webhooks", "/console/webhooks", ("GET", "/v1/webhooks")),
       ("audit", "Audit log", "/console/audit", ("GET", "/v1/audit")))


def may(principal: Principal | None, method: str, path: str) -> bool:
    if principal is None:
        return False
    return permissions.allowed(permissions.PERMISSIONS[(method, path)], principal.role, principal.owner)


def money(cents) -> str:
    if cents is None:
        return "—"
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(int(cents)), 100)
    return f"{sign}${whole:,}.{part:02d}"


def compact(cents) -> str:
    """$1.2M, $78.6k, $950: for the fork tree's small print."""
    dollars = int(cents) / 100
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(dollars) >= size:
            return f"${dollars / size:.1f}{unit}".replace(".0" + unit, unit)
    return f"${dollars:,.0f}"


def percent(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.{digits}f}%"


def moment(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def when(value) -> str:
    """A table's compact time: 02 Dec 18:43:07 (the full one is `moment`)."""
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%d %b %H:%M:%S")


def short(identifier) -> str:
    if not identifier:
        return "—"
    prefix, _, rest = str(identifier).partition("_")
    return f"{prefix}_…{rest[-6:]}" if rest else str(identifier)


def environment(directory: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(directory)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(money=money, compact=compact, when=when, percent=percent, moment=moment, short=short)
    return env


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def render(request: web.Request, template: str, session, principal, *, status: int = 200, **context) -> web.Response:
    from gateway.console import TEMPLATES

    nav = [(key, label, href) for key, label, href, route in NAV if may(principal, *route)]
    page = request.app[TEMPLATES].get_template(template)
    csrf = context.pop("csrf", "")
    text = page.render(principal=principal, csrf=session.csrf if session is not None else csrf,
                       nav=nav, active=context.pop("active", ""), may=lambda m, p: may(principal, m, p), **context)
    return web.Response(text=text, status=status, content_type="text/html")


async def problem(request, session, principal, status: int, title: str, message: str) -> web.Response:
    from gateway.console import secure_headers

    return secure_headers(render(request, "problem.html", session, principal, status=status, title=title,
                                 message=message, csrf=""))


def _engine(request: web.Request):
    from gateway.app import ENGINE

    return request.app[ENGINE]


def _audit_context(request: web.Request, principal: Principal, route: str) -> AuditContext:
    from gateway.app import REQUEST_ID

    return AuditContext(principal, request_id=request.get(REQUEST_ID, ""), client=request.remote or "", route=route)


# -- portfolios ------------------------------------------------------------------------
async def portfolios(request: web.Request, session, principal) -> web.Response:
    owner = (request.query.get("owner") or "").strip() or None
    try:
        owner = normalized_owner(owner)   # as owners are stored ("ａｎｎ" finds ann)
    except ValueError:
        pass                               # no owner has such a name: the list stays empty
    if principal.owner is not None:
        owner = principal.owner
    cursor = request.query.get("cursor") or None
    page = await lookups.list_portfolios(_engine(request), limit=25, cursor=cursor, owner=owner)
    total = sum(item.totals.balance for item in page.items)
    return render(request, "portfolios.html", session, principal, active="portfolios", page=page, owner=owner or "",
                  total=total, scoped=principal.owner is not None)


async def _own_portfolio(request, principal, portfolio_id: str):
    record = await _engine(request).portfolio_record(portfolio_id)
    if principal.owner is not None and record.owner != principal.owner:
        raise NotFound("no such portfolio", {"portfolio_id": portfolio_id})
    return record


async def portfolio(request: web.Request, session, principal) -> web.Response:
    portfolio_id = request.match_info["portfolio_id"]
    engine = _engine(request)
    record = await _own_portfolio(request, principal, portfolio_id)
    view, tree = await asyncio.gather(engine.get_portfolio(portfolio_id), engine.portfolio_tree(portfolio_id))
    analytics = await _or_none(engine.portfolio_analytics(record.root_id if record.parent_id is None
                                                          else portfolio_id))
    picture = drawing.layout_tree(tree.nodes, tree.root_id)
    return render(request, "portfolio.html", session, principal, active="portfolios", portfolio=view, tree=tree,
                  picture=picture, node_w=drawing.NODE_W, node_h=drawing.NODE_H, analytics=analytics)


async def _or_none(awaitable):
    """Analytics are a view on top of the books; a page still shows the books without them."""
    try:
        return await awaitable
    except EngineError:
        return None


# -- accounts --------------------------------------------------------------------------
async def account(request: web.Request, session, principal) -> web.Response:
    account_id = request.match_info["account_id"]
    engine = _engine(request)
    found = await engine.get_account(account_id)
    if principal.owner is not None and found.owner != principal.owner:
        raise NotFound("no such account", {"account_id": account_id})
    cursor = request.query.get("cursor") or None
    page = await engine.list_transactions(account_id, limit=TRANSACTIONS_PER_PAGE, cursor=cursor)
    recent = await engine.list_transactions(account_id, limit=CHART_ENTRIES_MAX)
    history = [(drawing.chart_moment(t.effective_date, t.created_at), t.balance_after) for t in reversed(recent.items)]
    chart = drawing.balance_chart(history)
    analytics = await _or_none(engine.account_analytics(account_id))
    # The breadcrumb names the account's portfolio (same owner: the scope check above holds).
    portfolio_name = (await engine.portfolio_record(found.portfolio_id)).name if found.portfolio_id else ""
    from gateway.views import account_view

    return render(request, "account.html", session, principal, active="portfolios",
                  account=account_view(found, engine.rules), page=page, chart=chart, analytics=analytics,
                  portfolio_name=portfolio_name,
                  chart_partial=len(recent.items) == CHART_ENTRIES_MAX and recent.next_cursor is not None,
                  first_page=cursor is None)


# -- events ----------------------------------------------------------------------------
def event_summary(event) -> dict:
    """One event as the feed's row shows it: a sentence, not its JSON."""
    payload = json.loads(bytes(event.payload)) if event.payload else {}
    kind = event.type
    if kind == "transaction.posted":
        text = (f"{payload.get('kind', '').replace('_', ' ')} {payload.get('direction', '')} "
                f"{money(payload.get('amount'))} · balance {money(payload.get('balance_after'))}")
    elif kind == "transfer.posted":
        text = (f"transfer {money(payload.get('amount'))} from {short(payload.get('from_account'))} "
                f"to {short(payload.get('to_account'))}")
    elif kind == "account.opened":
        text = f"{payload.get('type', '')} account “{payload.get('name', '')}” opened for {payload.get('owner', '')}"
    elif kind == "portfolio.forked":
        text = f"new unit forked with {money(payload.get('amount'))} from {short(payload.get('from_account'))}"
    elif kind == "portfolio.opened":
        text = f"portfolio “{(payload.get('portfolio') or {}).get('name', '')}” opened"
    elif kind == "portfolio.merged":
        text = f"unit merged: {money(payload.get('amount'))} into {short(payload.get('to_account'))}"
    elif kind == "account.status_changed":
        text = f"status changed to {payload.get('status', '')}"
    elif kind == "account.reinvested":
        text = (f"reinvested {payload.get('quarter', '')}: contracts {money(payload.get('contracts'))}, "
                f"LEAPS {money(payload.get('leaps'))}")
    elif kind.startswith("account.drawdown"):
        text = f"drawdown {percent(payload.get('drawdown'), 1)} (limit {percent(payload.get('limit'), 0)})"
    else:
        text = kind
    return {"seq": event.seq, "type": kind, "at": when(event.created_at), "summary": text,
            "account_id": event.account_id, "portfolio_id": event.portfolio_id,
            "account_short": short(event.account_id), "portfolio_short": short(event.portfolio_id)}


async def events(request: web.Request, session, principal) -> web.Response:
    engine = _engine(request)
    rows = await engine.store.fetch("SELECT coalesce(max(seq), 0) AS seq FROM events")
    head = rows[0]["seq"]
    items = await engine.events_page(after=max(0, head - EVENTS_SHOWN * 4), limit=limits.PAGE_SIZE_MAX,
                                     owner=principal.owner)
    shown = [event_summary(e) for e in items[-EVENTS_SHOWN:]]
    last = items[-1].seq if items else head
    return render(request, "events.html", session, principal, active="events", events=list(reversed(shown)),
                  last_seq=last)


def _resume_point(request: web.Request) -> int:
    for value in (request.headers.get("Last-Event-ID"), request.query.get("after")):
        if value and value.isascii() and value.isdigit() and len(value) <= 18:
            return int(value)
    return 0


async def event_stream(request: web.Request, session, principal) -> web.StreamResponse:
    """Server-sent events from the outbox, resuming after Last-Event-ID (the browser sends
    it on reconnect) or `?after=`. Bounded: it polls the feed, and ends after a while so
    the browser reconnects (a revoked token then stops getting events)."""
    from gateway.console import STOPPING

    engine, after = _engine(request), _resume_point(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await _stream(engine, response, after, principal.owner, request.app[STOPPING])
    except ConnectionResetError:  # the browser went away (a page change, a closed tab)
        pass
    return response


async def _stream(engine, response: web.StreamResponse, after: int, owner: str | None, stopping) -> None:
    loop = asyncio.get_running_loop()
    started = last_write = loop.time()
    await response.write(b"retry: 1000\n\n")
    while not stopping.is_set() and loop.time() - started < STREAM_LIFETIME_S:
        page = await engine.events_page(after=after, limit=100, owner=owner)
        for event in page:
            after = event.seq
            data = json.dumps(event_summary(event))
            await response.write(f"id: {event.seq}\nevent: engine\ndata: {data}\n\n".encode())
            last_write = loop.time()
        if not page:
            if loop.time() - last_write > STREAM_HEARTBEAT_S:
                await response.write(b": keep-alive\n\n")
                last_write = loop.time()
            try:
                await asyncio.wait_for(stopping.wait(), timeout=STREAM_POLL_S)
            except asyncio.TimeoutError:
                pass


# -- supervision -----------------------------------------------------------------------
def commit_latency(engine) -> dict:
    """Mean and an upper bound of the 99th percentile of batch commit latency, from the
    writer's histogram (its bucket bounds)."""
    samples = {s.name: s for metric in engine.metrics.commit_latency.collect() for s in metric.samples}
    count = next((s.value for name, s in samples.items() if name.endswith("_count")), 0.0)
    total = next((s.value for name, s in samples.items() if name.endswith("_sum")), 0.0)
    buckets = sorted(((float(s.labels["le"]), s.value) for metric in engine.metrics.commit_latency.collect()
                      for s in metric.samples if s.name.endswith("_bucket")), key=lambda pair: pair[0])
    p99 = next((bound for bound, cumulative in buckets if count and cumulative >= 0.99 * count), None)
    return {"batches": int(count), "mean_ms": (total / count * 1000) if count else None,
            "p99_ms": p99 * 1000 if p99 is not None and p99 != float("inf") else None}


async def supervision(request: web.Request, session, principal) -> web.Response:
    engine = _engine(request)
    status = await engine.supervisor_status()
    quarantined = [{"account_id": account_id, "why": why} for account_id, why in sorted(status["quarantined"].items())]
    busiest = sorted(status["supervisors"], key=lambda s: (-s["restarts"], -s["resident"], s["id"]))
    return render(request, "supervision.html", session, principal, active="supervision", sup=status,
                  quarantined=quarantined, supervisors=busiest[:SUPERVISORS_SHOWN], latency=commit_latency(engine),
                  released=request.query.get("released"),
                  can_release=may(principal, "POST", "/v1/admin/quarantine/{account_id}/release"))


async def release(request: web.Request, session, principal) -> web.StreamResponse:
    account_id = request.match_info["account_id"]
    engine = _engine(request)
    engine.release_quarantine(account_id)
    route = "POST /v1/admin/quarantine/{account_id}/release"
    try:
        await engine.security.record(_audit_context(request, principal, route), route, account_id,
                                     "200 released", {"via": "console"})
    except EngineError:
        pass  # released all the same; the API route records the same way, best effort
    return see_other(f"/console/supervision?released={account_id}")


# -- audit -----------------------------------------------------------------------------
def detail_text(value) -> str:
    """An audit detail as the log holds it: strings as they are, an object as its
    `key: value` pairs, anything else as JSON (null, ["portfolio.*"], 12) - never a
    Python repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ", ".join(f"{key}: {detail_text(item)}" for key, item in value.items())
    return json.dumps(value, ensure_ascii=False)


async def _audit_rows(request: web.Request):
    engine = _engine(request)
    rows = await engine.store.fetch("SELECT coalesce(max(seq), 0) AS seq FROM audit_log")
    head = rows[0]["seq"]
    before = request.query.get("before")
    end = int(before) if before and before.isascii() and before.isdigit() and len(before) <= 18 else head + 1
    start = max(0, end - 1 - AUDIT_PER_PAGE)
    records = await engine.security.audit_page(after=start, limit=AUDIT_PER_PAGE)
    records = [r for r in records if r.seq < end]
    shown = []
    for record in reversed(records):
        try:
            details = msgspec.json.decode(record.details)
        except msgspec.DecodeError:
            details = {}
        pairs = details if isinstance(details, dict) else {"value": details}
        shown.append({"record": record, "details": {key: detail_text(value) for key, value in pairs.items()}})
    return shown, head, (start + 1 if start > 0 else None)


async def audit(request: web.Request, session, principal, verdict=None) -> web.Response:
    shown, head, older = await _audit_rows(request)
    return render(request, "audit.html", session, principal, active="audit", records=shown, head=head,
                  older=older, verdict=verdict)


async def verify(request: web.Request, session, principal) -> web.Response:
    verdict = await _engine(request).security.verify_audit()
    return await audit(request, session, principal, verdict=verdict)


# -- webhooks --------------------------------------------------------------------------
async def _webhook_states(engine, scope: str | None) -> list[dict]:
    """Each endpoint the principal may see, with its delivery state (circuit, lag, the
    event being retried, dead letters) as `Webhooks.status` reports it."""
    states = {state["id"]: state for state in await engine.webhooks.status()}
    # An endpoint deleted between the two reads is left out.
    return [{"endpoint": endpoint, "state": states[endpoint.id]}
            for endpoint in engine.webhooks.list(scope=scope).items if endpoint.id in states]


async def webhooks(request: web.Request, session, principal) -> web.Response:
    rows = await _webhook_states(_engine(request), principal.owner)
    states = [row["state"] for row in rows]
    summary = {"enabled": sum(1 for row in rows if row["endpoint"].enabled),
               "open": sum(1 for state in states if state["circuit"] != "closed"),
               "dead_letters": sum(state["dead_letters"] for state in states),
               "lag_events": max((state["lag_events"] for state in states), default=0)}
    return render(request, "webhooks.html", session, principal, active="webhooks", rows=rows, summary=summary)


async def webhook(request: web.Request, session, principal) -> web.Response:
    engine, scope = _engine(request), principal.owner
    endpoint = engine.webhooks.get(request.match_info["webhook_id"], scope=scope)
    state = next((row["state"] for row in await _webhook_states(engine, scope) if row["endpoint"].id == endpoint.id),
                 None)
    if state is None:
        raise NotFound("no such webhook", {"webhook_id": endpoint.id})
    letters = await engine.webhooks.dead_letters(endpoint.id, limit=DEAD_LETTERS_SHOWN, scope=scope)
    attempts = await engine.webhooks.latest_attempts(endpoint.id, limit=WEBHOOK_ATTEMPTS_SHOWN, scope=scope)
    requeued = request.query.get("requeued")
    return render(request, "webhook.html", session, principal, active="webhooks", endpoint=endpoint, state=state,
                  letters=letters, attempts=attempts,
                  requeued=int(requeued) if requeued and requeued.isascii() and requeued.isdigit()
                  and len(requeued) <= 9 else None,
                  can_redeliver=may(principal, "POST", "/v1/webhooks/{webhook_id}/dead-letters/retry"))


async def redeliver(request: web.Request, session, principal) -> web.StreamResponse:
    """Redelivers one dead letter (the form's `seq`) or all of them, audited as the API
    route is."""
    seq = str((await request.post()).get("seq") or "")
    event_seq = int(seq) if seq.isascii() and seq.isdigit() and len(seq) <= 18 else None
    route = ("POST /v1/webhooks/{webhook_id}/dead-letters/{event_seq}/retry" if event_seq is not None
             else "POST /v1/webhooks/{webhook_id}/dead-letters/retry")
    endpoint_id = request.match_info["webhook_id"]
    done = await _engine(request).webhooks.redeliver(endpoint_id, event_seq, scope=principal.owner,
                                                     context=_audit_context(request, principal, route))
    return see_other(f"/console/webhooks/{endpoint_id}?requeued={done.requeued}")
