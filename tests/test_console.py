"""The operator console (issue 12) in a real headless browser: Debian's chromium driven by
Playwright, against the real app on a real port of 127.0.0.1, the real actors and a real
PostgreSQL database. `.ci/run` installs chromium; Playwright's own browser download is
never used (it cannot work here), only `executable_path`.

Every page is visited at 1280x800 and at 390x844 and screenshotted. The screenshots go to
a temporary directory; `make screenshots` (ALLUSE_CONSOLE_SCREENSHOTS=docs/console) writes
the ones checked in under docs/console/."""
from __future__ import annotations

import asyncio
import os
import re
import urllib.request
import uuid
from datetime import date, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from actors.settings import load_settings
from tests.conftest import WAIT_S
from tests.test_fuzz import LiveServer

ADMIN_TOKEN = "console-admin-token-0123456789abcdef"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCREENSHOT_BYTES_MAX = 300_000
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
TIMEOUT_MS = int(WAIT_S * 1000)
pytestmark = pytest.mark.asyncio(loop_scope="session")


def chromium_path() -> str:
    chosen = os.environ.get("ALLUSE_CHROMIUM")
    for candidate in ((chosen,) if chosen else CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("no chromium found: `apt-get install -y chromium` (.ci/run does it), or set ALLUSE_CHROMIUM")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def server(database_url):
    settings = load_settings({}, {"database": {"url": database_url}, "server": {"admin_token": ADMIN_TOKEN},
                                  "engine": {"fault_injection": True},
                                  "supervision": {"restarts_max": 1, "window_s": 60.0},
                                  # Webhooks to a receiver on 127.0.0.1 that fail fast: two attempts
                                  # an event, and a circuit that opens after four failures and stays
                                  # open for the rest of a test.
                                  "webhooks": {"allow_private_targets": True, "retry_schedule_s": [0.1],
                                               "jitter_ratio": 0.0, "timeout_s": 2.0, "circuit_failures_max": 4,
                                               "circuit_cooldown_s": 120.0}})
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: docs/console when asked (`make screenshots`), else a temp dir."""
    target = os.environ.get("ALLUSE_CONSOLE_SCREENSHOTS")
    directory = Path(target) if target else tmp_path_factory.mktemp("console")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def api(server: LiveServer, method: str, path: str, body=None, token: str = ADMIN_TOKEN) -> dict:
    status, _, reply = server.call(method, path, body, token=token,
                                   headers={"Idempotency-Key": str(uuid.uuid4())} if method == "POST" else None)
    assert status < 300, (method, path, status, reply)
    return reply


def token(server: LiveServer, role: str, owner: str | None = None) -> str:
    body = {"name": f"console {role}", "role": role, **({"owner": owner} if owner else {})}
    return api(server, "POST", "/v1/tokens", body)["token"]


HISTORY_WEEKS = 16
# The weeks of the history in which Ann's accounts book a loss, and its size in cents.
LOSSES = {4: {"revenue": 2_600_00}, 9: {"revenue": 6_000_00, "compounding": 4_000_00}, 13: {"revenue": 2_100_00}}


def seed(server: LiveServer) -> dict:
    """Ann: a root portfolio opened 16 weeks ago with a trade history week by week (so
    its analytics have something to say) that has forked one unit of part of its Gen-Acc's
    surplus, and a funded standalone account with enough history to page; Bob: a
    portfolio of his own."""
    today = date.today()
    start = today - timedelta(days=today.weekday(), weeks=HISTORY_WEEKS)
    ann = api(server, "POST", "/v1/portfolios", {"name": "Ann Income", "owner": "ann", "initial_capital": 250_000_00,
                                                 "opened_on": start.isoformat()})
    ids = {a["type"]: a["id"] for a in ann["accounts"]}
    generation, revenue = ids["generation"], ids["revenue"]
    for week in range(HISTORY_WEEKS):
        day = (start + timedelta(weeks=week, days=2)).isoformat()
        trades = [(revenue, "premium", 900_00 + (week % 5) * 140_00), (ids["compounding"], "premium",
                                                                      380_00 + (week % 3) * 90_00),
                  (generation, "premium", 1_100_00 + (week % 4) * 120_00)]
        trades += [(ids[account_type], "loss", amount) for account_type, amount in LOSSES.get(week, {}).items()]
        if week % 4 == 3:
            trades.append((revenue, "fee", 35_00))
        for account_id, kind, amount in trades:
            api(server, "POST", f"/v1/accounts/{account_id}/trades", {"kind": kind, "amount": amount,
                                                                     "effective_date": day})
    api(server, "POST", f"/v1/accounts/{generation}/fork", {"amount": 15_000_00})
    bob = api(server, "POST", "/v1/portfolios", {"name": "Bob Wheel", "owner": "bob", "initial_capital": 80_000_00})
    savings = api(server, "POST", "/v1/accounts", {"name": "Ann Reserve", "type": "revenue", "owner": "ann"})
    for index in range(25):
        api(server, "POST", f"/v1/accounts/{savings['id']}/deposits", {"amount": 1_000_00 + index * 10_00,
                                                                      "memo": f"weekly {index + 1}"})
    api(server, "POST", "/v1/transfers", {"from_account": savings["id"], "to_account": revenue, "amount": 500_00})
    return {"ann": ann, "bob": bob, "generation": generation, "revenue": revenue, "savings": savings["id"]}


async def sign_in(browser, server: LiveServer, secret: str, viewport=DESKTOP):
    context = await browser.new_context(viewport=viewport, base_url=server.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    await page.goto("/")
    await page.fill("#token", secret)
    await page.click("[data-action=sign-in]")
    await page.wait_for_url(re.compile(r".*/console/portfolios$"))
    return context, page


async def snap(page, shots: Path, name: str, section: str | None = None) -> None:
    """The whole page at desktop size; what a phone shows at first (its long pages would
    make pictures taller than they are useful); or only the element `section` selects."""
    path = shots / f"{name}.png"
    if section is not None:  # from the top of the whole page, so the sticky top bar stays out of it
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(path=str(path), full_page=True, clip=await page.locator(section).bounding_box())
        assert 0 < path.stat().st_size <= SCREENSHOT_BYTES_MAX, (name, path.stat().st_size)
        return
    await page.screenshot(path=str(path), full_page=page.viewport_size["width"] > PHONE["width"])
    size = path.stat().st_size
    if size > SCREENSHOT_BYTES_MAX:  # keep checked-in pictures small: the visible part only
        await page.screenshot(path=str(path), full_page=False)
        size = path.stat().st_size
    assert 0 < size <= SCREENSHOT_BYTES_MAX, (name, size)


async def shows_the_risk_and_return_metrics(page) -> None:
    """Issue 15's measures, each a number (or a dash where the history leaves it
    undefined), in the analytics section of an account or portfolio page."""
    metrics = page.locator("[data-section=metrics]")
    text = await metrics.inner_text()
    for label in ("Sharpe", "Sortino", "Calmar", "Value at risk", "Expected shortfall", "Best week", "Worst week",
                  "Winning weeks", "Longest", "Recovery", "Skew", "Kurtosis"):
        assert label in text, (label, text)
    for name in ("sharpe", "sortino", "var", "cvar", "best-week", "worst-week", "skew", "kurtosis"):
        value = await metrics.locator(f"[data-metric={name}]").inner_text()
        assert re.fullmatch(r"−?-?\d+\.\d+%?", value.strip()), (name, value)
    assert (await metrics.locator("[data-metric=worst-week]").inner_text()).startswith("-")


async def looks_like_a_product(page) -> None:
    """No raw JSON on the page, and nothing wider than the window."""
    text = await page.inner_text("main")
    assert not re.search(r'\{\s*"[a-z_]+"\s*:', text), text[:500]
    overflow = await page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"the page is {overflow}px wider than the window"


async def test_an_admin_signs_in_walks_every_page_and_signs_out(browser, server, shots):
    data = seed(server)
    for viewport, suffix in ((DESKTOP, ""), (PHONE, "-phone")):
        context = await browser.new_context(viewport=viewport, base_url=server.url)
        context.set_default_timeout(TIMEOUT_MS)
        page = await context.new_page()
        await page.goto("/console/portfolios")
        await page.wait_for_url(re.compile(r".*/console/sign-in.*"))
        await page.fill("#token", "alu_not-a-real-token")
        await page.click("[data-action=sign-in]")
        assert "not valid" in await page.inner_text(".alert")
        await snap(page, shots, f"sign-in{suffix}")
        await page.fill("#token", ADMIN_TOKEN)
        await page.click("[data-action=sign-in]")
        await page.wait_for_url(re.compile(r".*/console/portfolios$"))
        assert await page.get_attribute("[data-role]", "data-role") == "admin"
        rows = page.locator("table[data-table=portfolios] tbody tr")
        assert await rows.count() == 2 and "$" in await page.inner_text("table[data-table=portfolios]")
        await looks_like_a_product(page)
        await snap(page, shots, f"portfolios{suffix}")

        await page.fill("input[name=owner]", "bob")
        await page.click("form.search button")
        await page.wait_for_url(re.compile(r".*owner=bob.*"))
        assert await page.locator("table[data-table=portfolios] tbody tr").count() == 1
        assert "Bob Wheel" in await page.inner_text("table[data-table=portfolios]")

        await page.goto(f"/console/portfolios/{data['ann']['id']}")
        assert await page.locator("svg.tree a.node").count() == 2  # the root and the unit it forked
        assert await page.locator("svg.tree path.edge").count() == 1
        assert "time-weighted return" in (await page.inner_text("[data-section=analytics]")).lower()
        await shows_the_risk_and_return_metrics(page)
        await looks_like_a_product(page)
        await snap(page, shots, f"portfolio{suffix}")

        await page.goto(f"/console/accounts/{data['revenue']}")
        assert await page.locator("svg.chart polyline.line").count() == 1
        await shows_the_risk_and_return_metrics(page)
        # Three losing weeks out of sixteen trading ones (the opening week has no return).
        assert await page.inner_text("[data-metric=win-rate]") == "81%"
        await looks_like_a_product(page)
        await snap(page, shots, f"account{suffix}")
        await snap(page, shots, f"account-analytics{suffix}", "[data-section=analytics]")

        await page.goto(f"/console/accounts/{data['savings']}")
        assert await page.locator("table[data-table=transactions] tbody tr").count() == 20
        await page.click("[data-action=older]")
        assert await page.locator("table[data-table=transactions] tbody tr").count() == 6  # 25 deposits + 1 transfer

        await page.goto("/console/events")
        await page.wait_for_selector(".live.on")
        assert await page.locator("table[data-table=events] tbody tr").count() >= 20
        await looks_like_a_product(page)
        await snap(page, shots, f"events{suffix}")

        await page.goto("/console/supervision")
        assert int(await page.inner_text("[data-value=resident]")) >= 1
        assert await page.locator("[data-empty=quarantined]").count() == 1
        await looks_like_a_product(page)
        await snap(page, shots, f"supervision{suffix}")

        await page.goto("/console/audit")
        await page.click("[data-action=verify]")
        assert "The chain is intact" in await page.inner_text("[data-verdict=valid]")
        await looks_like_a_product(page)
        await snap(page, shots, f"audit{suffix}")

        await page.goto("/docs")
        await page.wait_for_selector(".swagger-ui .opblock")
        assert await page.locator(".swagger-ui .opblock").count() >= 30
        await snap(page, shots, f"docs{suffix}")

        await page.goto("/console/portfolios")
        await page.click("[data-action=sign-out]")
        await page.wait_for_url(re.compile(r".*/console/sign-in$"))
        await page.goto("/console/supervision")
        await page.wait_for_url(re.compile(r".*/console/sign-in.*"))
        await context.close()


async def test_a_fork_appears_in_the_tree_once_premiums_push_the_gen_acc_over_its_threshold(browser, server):
    portfolio = api(server, "POST", "/v1/portfolios", {"name": "Growth", "owner": "ann",
                                                       "initial_capital": 250_000_00})
    generation = next(a["id"] for a in portfolio["accounts"] if a["type"] == "generation")
    context, page = await sign_in(browser, server, ADMIN_TOKEN)
    try:
        await page.goto(f"/console/portfolios/{portfolio['id']}")
        assert await page.locator("svg.tree a.node").count() == 1
        for _ in range(2):  # $25,000 each: the second crosses baseline + $50,000
            api(server, "POST", f"/v1/accounts/{generation}/trades", {"kind": "premium", "amount": 25_000_00})
        await page.reload()
        nodes = page.locator("svg.tree a.node")
        assert await nodes.count() == 2
        unit = page.locator("svg.tree a.node:not(.current)")
        label = await unit.text_content()
        assert "gen 1" in label and "$50,000.00" in label, label
        await unit.click()
        await page.wait_for_url(re.compile(r".*/console/portfolios/prt_.*"))
        assert "forked unit, generation 1" in await page.inner_text(".heading")
    finally:
        await context.close()


async def test_an_event_arrives_live_and_the_stream_resumes_after_the_last_seen_event(browser, server):
    account = api(server, "POST", "/v1/accounts", {"name": "Live", "type": "revenue", "owner": "ann"})
    context, page = await sign_in(browser, server, ADMIN_TOKEN)
    try:
        await page.goto("/console/events")
        await page.wait_for_selector(".live.on")
        before = await page.locator("table[data-table=events] tbody tr").count()
        api(server, "POST", f"/v1/accounts/{account['id']}/deposits", {"amount": 123_45})
        row = page.locator("table[data-table=events] tbody tr.fresh", has_text="$123.45")
        await row.wait_for()
        assert await page.locator("table[data-table=events] tbody tr").count() == before + 1
        seq = int(await row.get_attribute("data-seq"))
        api(server, "POST", f"/v1/accounts/{account['id']}/deposits", {"amount": 678_90})
        # What the browser sends on a reconnect: the stream resumes after that event.
        first = await page.evaluate("""async (seq) => {
            const reply = await fetch('/console/events/stream', {headers: {'Last-Event-ID': String(seq)}});
            const reader = reply.body.getReader();
            let text = '';
            while (!/\\nid: \\d+/.test('\\n' + text) || !text.includes('\\n\\n', text.indexOf('id: '))) {
                const chunk = await reader.read();
                if (chunk.done) break;
                text += new TextDecoder().decode(chunk.value);
            }
            reader.cancel();
            return text;
        }""", seq)
        ids = [int(i) for i in re.findall(r"^id: (\d+)$", first, re.MULTILINE)]
        assert ids and ids[0] == seq + 1 and "$678.90" in first, first
    finally:
        await context.close()


def quarantine(server: LiveServer, account_id: str) -> None:
    """Crash the account's actor past the restart limit (1 in these tests)."""
    def supervised():
        status = api(server, "GET", "/v1/supervisor/status")
        return status, next((child for node in status["supervisors"] for child in node["accounts"]
                             if child["account_id"] == account_id), None)

    for failure in (1, 2):
        api(server, "POST", "/v1/admin/faults", {"account_id": account_id, "fault": "crash"})
        status, _, _ = server.call("POST", f"/v1/accounts/{account_id}/deposits", {"amount": 1}, token=ADMIN_TOKEN)
        assert status == 503, status
        wait_until(lambda: (supervised()[1] or {}).get("restarts", 0) >= failure or
                   account_id in supervised()[0]["quarantined"], f"failure {failure} to be handled")
    wait_until(lambda: account_id in supervised()[0]["quarantined"], "the quarantine")


def wait_until(probe, what: str) -> None:
    import time

    deadline = time.monotonic() + WAIT_S
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def test_an_operator_releases_a_quarantine_that_a_viewer_can_only_see(browser, server, shots):
    account = api(server, "POST", "/v1/accounts", {"name": "Flaky", "type": "revenue", "owner": "ann"})
    api(server, "POST", f"/v1/accounts/{account['id']}/deposits", {"amount": 10_00})
    quarantine(server, account["id"])
    viewer_context, viewer = await sign_in(browser, server, token(server, "viewer"))
    operator_context, operator = await sign_in(browser, server, token(server, "operator"))
    try:
        await viewer.goto("/console/supervision")
        assert await viewer.locator(f"[data-quarantined='{account['id']}']").count() == 1
        assert await viewer.locator("[data-action=release]").count() == 0
        assert await viewer.locator("[data-nav=audit]").count() == 0  # the audit log is for admins
        await operator.goto("/console/supervision")
        assert await operator.locator(f"[data-quarantined='{account['id']}']").count() == 1
        await snap(operator, shots, "supervision-quarantined")
        await operator.click(f"[data-action=release][data-account='{account['id']}']")
        await operator.wait_for_selector("[data-flash=released]")
        assert await operator.locator(f"[data-quarantined='{account['id']}']").count() == 0
        deposit = api(server, "POST", f"/v1/accounts/{account['id']}/deposits", {"amount": 1})
        assert deposit["balance_after"] == 10_01
        records = api(server, "GET", "/v1/audit?limit=1000")["items"]
        assert any(r["target"] == account["id"] and r["outcome"] == "200 released" and r["role"] == "operator"
                   and r["details"] == {"via": "console"} for r in records)
    finally:
        await viewer_context.close()
        await operator_context.close()


async def test_a_scoped_viewer_sees_only_its_owners_portfolios(browser, server):
    data = seed(server)
    context, page = await sign_in(browser, server, token(server, "viewer", owner="ann"))
    try:
        listed = await page.inner_text("table[data-table=portfolios]")
        assert "Ann Income" in listed and "Bob Wheel" not in listed
        assert await page.locator("input[name=owner]").count() == 0
        await page.goto(f"/console/portfolios/{data['bob']['id']}")
        assert "Not found" in await page.inner_text("h1")
        bob_account = data["bob"]["accounts"][0]["id"]
        response = await page.goto(f"/console/accounts/{bob_account}")
        assert response.status == 404 and "Not found" in await page.inner_text("h1")
        assert (await page.goto("/console/portfolios?owner=bob")).status == 200
        assert "Bob Wheel" not in await page.inner_text("main")
        assert await page.locator("[data-nav=supervision]").count() == 0
        assert (await page.goto("/console/supervision")).status == 403
        await page.goto("/console/events")
        await page.wait_for_selector(".live.on")
        shown = await page.inner_text("table[data-table=events]")
        assert data["bob"]["id"][-6:] not in shown
        assert (await page.goto(f"/console/portfolios/{data['ann']['id']}")).status == 200
    finally:
        await context.close()


async def test_the_session_cookie_is_strict_and_forms_without_the_csrf_token_are_refused(browser, server):
    account = api(server, "POST", "/v1/accounts", {"name": "Guarded", "type": "revenue", "owner": "ann"})
    quarantine(server, account["id"])
    context, page = await sign_in(browser, server, token(server, "operator"))
    try:
        (cookie,) = [c for c in await context.cookies() if c["name"] == "alluse_session"]
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["expires"] > 0
        forged = await context.request.post(f"/console/quarantine/{account['id']}/release", form={"csrf": "guess"},
                                      max_redirects=0)
        assert forged.status == 403
        assert account["id"] in api(server, "GET", "/v1/supervisor/status")["quarantined"]
        refused = await context.request.post("/console/sign-in", form={"token": ADMIN_TOKEN}, max_redirects=0)
        assert refused.status == 403
    finally:
        await context.close()


async def test_the_api_reference_needs_no_token_and_loads_nothing_from_elsewhere(browser, server):
    context = await browser.new_context(viewport=DESKTOP, base_url=server.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        await page.goto("/docs")
        await page.wait_for_selector(".swagger-ui .opblock")
        assert "ALL-USE Account Engine" in await page.inner_text(".swagger-ui .info")
        assert requested and all(url.startswith(server.url) or url.startswith("data:") for url in requested), \
            requested
    finally:
        await context.close()


def receiver() -> LiveServer:
    """Webhook endpoints on 127.0.0.1, on a thread and loop of their own (the test's loop
    blocks in `api` calls): a path with `down` in it answers 503, any other 204."""
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if "down" in request.path:
            return web.Response(status=503, text="maintenance window, try again later")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{path:.*}", answer)
    return LiveServer(None, app=app)


async def test_the_webhooks_page_shows_circuits_attempts_and_dead_letters_to_admins_only(browser, server, shots):
    with receiver() as hooks:
        synced = api(server, "POST", "/v1/webhooks", {"url": hooks.url + "/alluse/ledger-sync",
                                                      "description": "Ledger sync"})
        down = api(server, "POST", "/v1/webhooks", {"url": hooks.url + "/alluse/risk-desk-down",
                                                    "description": "Risk desk", "owner": "ann",
                                                    "event_types": ["portfolio.*", "transfer.posted"]})
        seed(server)

        def state(endpoint_id: str) -> dict:
            return next(s for s in api(server, "GET", "/v1/supervisor/status")["webhooks"] if s["id"] == endpoint_id)

        # Two attempts an event: the first two of Ann's events become dead letters and the
        # fourth failure opens the circuit, which holds the next one.
        wait_until(lambda: state(down["id"])["circuit"] == "open" and state(down["id"])["dead_letters"] == 2,
                   "the risk desk's circuit to open over two dead letters")
        wait_until(lambda: state(synced["id"])["lag_events"] == 0, "the ledger sync to catch up")
        for viewport, suffix in ((DESKTOP, ""), (PHONE, "-phone")):
            context, page = await sign_in(browser, server, ADMIN_TOKEN, viewport)
            try:
                await page.click("[data-nav=webhooks]")
                await page.wait_for_url(re.compile(r".*/console/webhooks$"))
                assert await page.get_attribute(f"[data-webhook-row='{down['id']}'] [data-circuit]",
                                                "data-circuit") == "open"
                assert await page.get_attribute(f"[data-webhook-row='{synced['id']}'] [data-circuit]",
                                                "data-circuit") == "closed"
                assert await page.inner_text("[data-value=dead-letters]") == "2"
                await looks_like_a_product(page)
                await snap(page, shots, f"webhooks{suffix}")

                await page.click(f"[data-webhook='{down['id']}']")
                await page.wait_for_url(re.compile(rf".*/console/webhooks/{down['id']}$"))
                assert await page.locator("table[data-table=dead-letters] tbody tr").count() == 2
                tried = await page.inner_text("table[data-table=attempts]")
                assert "http error 503" in tried, tried
                if viewport is DESKTOP:  # the answer's column is hidden on a phone
                    assert "maintenance window" in tried, tried
                await looks_like_a_product(page)
                await snap(page, shots, f"webhook{suffix}")
            finally:
                await context.close()

        context, page = await sign_in(browser, server, ADMIN_TOKEN)
        try:
            await page.goto(f"/console/webhooks/{synced['id']}")
            assert await page.locator("[data-empty=dead-letters]").count() == 1
            assert "delivered" in await page.inner_text("table[data-table=attempts]")
            await page.goto(f"/console/webhooks/{down['id']}")
            await page.click("[data-action=redeliver-all]")
            await page.wait_for_selector("[data-flash=requeued]")
            assert (await page.inner_text("[data-flash=requeued]")).startswith("2 dead letters queued")
        finally:
            await context.close()
        records = api(server, "GET", "/v1/audit?limit=1000")["items"]
        assert any(r["action"] == "redeliver_webhook" and r["target"] == down["id"] and r["role"] == "admin"
                   for r in records)

        # Webhooks are for admins; a scoped admin sees only its owner's endpoints.
        for role in ("operator", "viewer"):
            context, page = await sign_in(browser, server, token(server, role))
            try:
                assert await page.locator("[data-nav=webhooks]").count() == 0
                assert (await page.goto("/console/webhooks")).status == 403
            finally:
                await context.close()
        context, page = await sign_in(browser, server, token(server, "admin", owner="bob"))
        try:
            await page.goto("/console/webhooks")
            assert await page.locator("[data-empty=webhooks]").count() == 1
            assert (await page.goto(f"/console/webhooks/{down['id']}")).status == 404
        finally:
            await context.close()


async def test_audit_details_who_breadcrumbs_and_forecasts_read_as_words_not_python(browser, server):
    cleo = api(server, "POST", "/v1/portfolios", {"name": "Cleo Income", "owner": "cleo",
                                                  "initial_capital": 250_000_00})
    revenue = next(a["id"] for a in cleo["accounts"] if a["type"] == "revenue")
    api(server, "POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/hook", "event_types": ["portfolio.*"]})
    assert server.call("GET", "/v1/accounts", token=None)[0] == 401
    context, page = await sign_in(browser, server, ADMIN_TOKEN)
    try:
        await page.goto("/console/audit")
        rows = page.locator("table[data-table=audit] tbody tr")
        details = await rows.filter(has_text="create_webhook").locator("[data-details]").inner_text()
        assert 'event_types ["portfolio.*"]' in details and "owner null" in details, details
        anonymous = rows.filter(has_text="401 unauthorized").first
        assert (await anonymous.locator("[data-who]").inner_text()).strip() == "anonymous"
        assert "['" not in await page.inner_text("table[data-table=audit]")

        await page.goto(f"/console/accounts/{revenue}")
        assert await page.inner_text("[data-crumb=portfolio]") == "Cleo Income"
        await page.goto(f"/console/portfolios/{cleo['id']}")
        forecast = await page.inner_text("[data-value=next-fork-merge]")
        assert "—" in forecast and "— wk" not in forecast, forecast  # a root never merges
    finally:
        await context.close()


def sign_in_text(settings) -> str:
    """The sign-in page of a server started with `settings`."""
    with LiveServer(settings) as live:
        with urllib.request.urlopen(f"{live.url}/console/sign-in", timeout=10) as response:
            return response.read().decode()


async def test_the_sign_in_page_names_the_admin_token_file_of_the_running_engine(database_url, tmp_path):
    """Where the token really is (ALLUSE_DATA_DIR's), not the default `.alluse`."""
    secret = "console-kept-admin-token-0123456789abcdef"
    (tmp_path / "admin-token").write_text(secret + "\n")
    kept = await asyncio.to_thread(sign_in_text, load_settings({}, {
        "database": {"url": database_url, "data_dir": str(tmp_path)}, "server": {"admin_token": secret}}))
    assert f"<code data-value=\"token-file\">{tmp_path / 'admin-token'}</code>" in kept, kept
    assert ".alluse/admin-token" not in kept
    # A token the service was configured with (ALLUSE_ADMIN_TOKEN) is in no file.
    configured = await asyncio.to_thread(sign_in_text, load_settings({}, {
        "database": {"url": database_url, "data_dir": str(tmp_path)}, "server": {"admin_token": ADMIN_TOKEN}}))
    assert "ALLUSE_ADMIN_TOKEN" in configured and "token-file" not in configured, configured


async def test_screenshots_are_checked_in_for_every_page():  # async: the module's mark is asyncio
    directory = Path(__file__).resolve().parent.parent / "docs" / "console"
    for name in ("sign-in", "portfolios", "portfolio", "account", "account-analytics", "events", "supervision",
                 "audit", "webhooks", "webhook", "docs"):
        for suffix in ("", "-phone"):
            path = directory / f"{name}{suffix}.png"
            assert path.exists(), f"{path} is missing: run `make screenshots`"
            assert path.stat().st_size <= SCREENSHOT_BYTES_MAX, path


