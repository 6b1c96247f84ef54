"""Analytics through the real engine and the real PostgreSQL (one fresh database per test,
from conftest.py), in-process and over HTTP (the aiohttp app around the same `Engine`):
effective dates and opening dates, account and portfolio analytics against
`engine.analytics` computed directly from the ledger, the live `drawdown_breach` flag
(its events, `Engine.drawdown_breaches()`, the `alluse_drawdown_breaches` gauge) and bad
input.

Histories are imported the way the strategy engine would: a portfolio `opened_on` 20
weeks ago, then weekly trades booked with an `effective_date` in the week they belong
to. Waiting is on conditions with timeouts, never on a bare sleep: the drawdown check
runs in the background after a trade, so `settled()` waits for the engine's background
tasks started so far before a test asserts that something did *not* happen."""
from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import asynccontextmanager
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction

import msgspec
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from actors.api import Engine
from actors import risk
from actors.risk import CHECKERS as DRAWDOWN_CHECKERS
from actors.settings import load_settings
from engine import analytics
from engine.analytics import Entry
from engine.errors import NotFound, Refused, ValidationFailed
from gateway.app import create_app
from test_http import TOKEN, Api, assert_error  # the HTTP suite's client and error-shape check
from tests.conftest import eventually

WAIT_S = 15.0
CAPITAL = 100_000_00          # Gen-Acc $40,000, Rev-Acc $30,000, Com-Acc $30,000
RATES_BPS = {"generation": 150, "revenue": 100, "compounding": 50}
DRAWDOWN_EVENTS = ("account.drawdown_breach", "account.drawdown_recovered")


def today() -> date:
    return datetime.now(timezone.utc).date()  # the engine's clock is UTC


# -- the service -------------------------------------------------------------------------
@asynccontextmanager
async def serving(database_url: str, analytics_settings: dict | None = None, **rules):
    """A started Engine and an HTTP client of the app around that very engine."""
    overrides = {"database": {"url": database_url}, "server": {"admin_token": TOKEN}}
    if rules:
        overrides["rules"] = rules
    if analytics_settings:
        overrides["analytics"] = analytics_settings
    settings = load_settings({}, overrides)
    engine = Engine(settings)
    await engine.start()
    try:
        client = TestClient(TestServer(create_app(settings, engine)))
        await client.start_server()
        try:
            yield engine, Api(client)
        finally:
            await client.close()
    finally:
        await engine.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def service(database_url):
    async with serving(database_url) as both:
        yield both


# -- helpers ---------------------------------------------------------------------------

async def settled(engine: Engine, timeout_s: float = WAIT_S) -> None:
    """Waits for every background task the engine has started so far (the drawdown check
    that follows a trade is one), so an absent event is really absent."""
    pending = set(engine._background)
    if pending:
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        assert not still, f"{len(still)} background tasks still running after {timeout_s} s"


async def drawdown_events(engine: Engine, account_id: str | None = None) -> list:
    events, after = [], 0
    while True:
        page = await engine.events_page(after=after, limit=500)
        if not page:
            return [e for e in events if e.type in DRAWDOWN_EVENTS
                    and (account_id is None or e.account_id == account_id)]
        events.extend(page)
        after = page[-1].seq


async def wait_for_drawdown_events(engine: Engine, account_id: str, count: int) -> list:
    async def probe():
        found = await drawdown_events(engine, account_id)
        return found if len(found) >= count else None

    return await eventually(probe, f"{count} drawdown events of {account_id}")


async def history(engine: Engine, account_id: str) -> list[Entry]:
    """The account's ledger from its public transaction list (oldest first), as the
    analytics read it."""
    items, cursor = [], None
    while True:
        page = await engine.list_transactions(account_id, limit=500, cursor=cursor)
        items.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    items.sort(key=lambda t: t.sequence)
    return [Entry(t.effective_date, t.kind, t.direction, t.amount, t.balance_after) for t in items]


async def open_portfolio(engine: Engine, weeks_back: int = 20, capital: int = CAPITAL):
    opened = today() - timedelta(weeks=weeks_back)
    portfolio = await engine.create_portfolio(name=f"P-{uuid.uuid4().hex[:6]}", owner="ann",
                                              initial_capital=capital, opened_on=opened)
    return portfolio, opened, {a.type: a.id for a in portfolio.accounts}


async def weekly_premiums(engine: Engine, account_id: str, opened: date, weeks: range, rate_bps: int) -> int:
    """One premium of rate_bps of the balance per week, dated opened + 7 w days."""
    balance = (await engine.get_account(account_id)).balance
    for week in weeks:
        trade = await engine.book_trade(account_id, kind="premium", amount=balance * rate_bps // 10_000,
                                        effective_date=opened + timedelta(weeks=week))
        balance = trade.balance_after
    return balance


def plain(value) -> dict:
    """A result as the HTTP API shows it."""
    return json.loads(msgspec.json.encode(value))


def without_accounts(value: dict) -> tuple[dict, list]:
    rest = dict(value)
    accounts = sorted(rest.pop("accounts"), key=lambda a: a["account_id"])
    return rest, accounts


async def direct_account_analytics(engine: Engine, account_id: str, weeks: int | None = None):
    """engine.analytics.account_analytics on the account's public history."""
    account = await engine.get_account(account_id)
    view = await engine.get_portfolio(account.portfolio_id)
    members = [await engine.get_account(a.id) for a in view.accounts]
    return analytics.account_analytics(account, await history(engine, account_id), today=today(), weeks=weeks,
                                       rules=engine.rules, portfolio_balance=sum(a.balance for a in members))


async def direct_portfolio_analytics(engine: Engine, portfolio_id: str, weeks: int | None = None):
    portfolios = await engine.store.portfolio_tree(portfolio_id, depth_max=engine.rules.portfolio_depth_max + 1,
                                                   nodes_max=engine.settings.engine.tree_nodes_max)
    root = next(p for p in portfolios if p.id == portfolio_id)
    ids = [i for p in portfolios for i in p.account_ids]
    accounts = {i: await engine.get_account(i) for i in ids}
    entries = {i: await history(engine, i) for i in ids}
    return analytics.portfolio_analytics(root, portfolios, accounts, entries, today=today(), weeks=weeks,
                                         rules=engine.rules)


async def gauge(api: Api) -> float:
    reply = await api.get("/metrics", token=None)
    assert reply.status == 200
    for line in reply.body.splitlines():
        if line.startswith("alluse_drawdown_breaches "):
            return float(line.split()[1])
    raise AssertionError("no alluse_drawdown_breaches in /metrics")


# -- effective dates ---------------------------------------------------------------------
async def test_trades_are_booked_to_their_effective_date_and_portfolios_to_their_opening(service):
    engine, api = service
    portfolio, opened, ids = await open_portfolio(engine)
    assert portfolio.opened_on == opened
    view = await api.ok(f"/v1/portfolios/{portfolio.id}")
    assert view["opened_on"] == opened.isoformat()
    trade = await api.created(f"/v1/accounts/{ids['revenue']}/trades",
                              {"kind": "premium", "amount": 300_00,
                               "effective_date": (opened + timedelta(weeks=3)).isoformat()})
    assert trade["effective_date"] == (opened + timedelta(weeks=3)).isoformat()
    # the same date again is fine; the entries of the account are in date order
    again = await engine.book_trade(ids["revenue"], kind="fee", amount=1_00, effective_date=opened + timedelta(weeks=3))
    assert again.effective_date == opened + timedelta(weeks=3)
    default = await engine.book_trade(ids["revenue"], kind="premium", amount=1_00)
    assert default.effective_date == today()
    entries = await history(engine, ids["revenue"])
    assert [e.effective_date for e in entries] == [opened, opened + timedelta(weeks=3),
                                                   opened + timedelta(weeks=3), today()]


# -- account and portfolio analytics -------------------------------------------------------
async def test_account_analytics_of_an_imported_history_match_the_pure_functions(service):
    engine, api = service
    portfolio, opened, ids = await open_portfolio(engine)
    for account_type, account_id in ids.items():
        await weekly_premiums(engine, account_id, opened, range(1, 20), RATES_BPS[account_type])
    await engine.book_trade(ids["revenue"], kind="fee", amount=25_00, effective_date=opened + timedelta(weeks=19))
    await engine.deposit(ids["revenue"], 5_000_00)      # flows, this week
    await engine.withdraw(ids["revenue"], 2_000_00)
    await settled(engine)

    result = await engine.account_analytics(ids["revenue"])
    assert plain(result) == plain(await direct_account_analytics(engine, ids["revenue"]))
    # known answers: the opening week flat (it counts: it starts when the capital arrives),
    # 19 weeks of 1% (to the cent), the fee in week 19, this week flat (its flows weighted)
    rows = result.weekly_returns
    assert rows[0].week_start == analytics.week_of(opened) and rows[0].weekly_return == 0.0
    assert rows[0].first_inflow_weekday == opened.weekday() and rows[0].flow == rows[0].average_capital
    assert rows[-1].week_start == analytics.week_of(today())
    assert [r.weekly_return for r in rows[1:19]] == pytest.approx([0.01] * 18, abs=1e-6)
    assert rows[-1].weekly_return == 0.0 and rows[-1].flow == 3_000_00
    assert rows[-1].flow_cent_days == 3_000_00 * (7 - today().weekday())
    assert result.performance.weeks == 21
    assert result.performance.max_drawdown == 0.0
    assert result.performance.income["fee"] == 25_00
    assert result.performance.target_weekly_return == 0.01
    assert result.risk.flags == []
    assert result.trend.label == "declining"  # the fee, then this week (no trades yet)
    revenue = await engine.get_account(ids["revenue"])
    assert result.balance == revenue.balance
    assert result.risk.concentration == pytest.approx(
        revenue.balance / (await engine.get_portfolio(portfolio.id)).totals.balance)
    assert result.forecast.balance["4"] > revenue.balance

    # over HTTP: the very same figures, and the window
    assert await api.ok(f"/v1/accounts/{ids['revenue']}/analytics") == plain(result)
    windowed = await api.ok(f"/v1/accounts/{ids['revenue']}/analytics?weeks=4")
    assert windowed == plain(await engine.account_analytics(ids["revenue"], weeks=4))
    assert windowed == plain(await direct_account_analytics(engine, ids["revenue"], weeks=4))
    assert len(windowed["weekly_returns"]) == 4
    for account_type in ("generation", "compounding"):
        reply = await api.ok(f"/v1/accounts/{ids[account_type]}/analytics")
        assert reply == plain(await direct_account_analytics(engine, ids[account_type]))
        assert reply["performance"]["target_weekly_return"] == RATES_BPS[account_type] / 10_000


async def test_portfolio_analytics_of_an_imported_history_match_the_pure_functions(service):
    engine, api = service
    portfolio, opened, ids = await open_portfolio(engine)
    for account_type, account_id in ids.items():
        await weekly_premiums(engine, account_id, opened, range(1, 20), RATES_BPS[account_type])
    await engine.book_trade(ids["generation"], kind="loss", amount=1_000_00,
                            effective_date=opened + timedelta(weeks=19))
    await engine.transfer(ids["revenue"], ids["generation"], 1_000_00)   # inside the portfolio: a flow
    await settled(engine)

    result = await engine.portfolio_analytics(portfolio.id)
    direct = await direct_portfolio_analytics(engine, portfolio.id)
    assert without_accounts(plain(result)) == without_accounts(plain(direct))
    totals = (await engine.get_portfolio(portfolio.id)).totals
    assert result.balance == totals.balance
    assert result.growth == analytics.Growth(units_created=0, units_merged=0, units_active=0, forked_cents=0,
                                             merged_cents=0)
    # the portfolio's weekly return is the summed trades over the summed start balances
    for row in result.weekly_returns[1:]:
        assert row.weekly_return == row.net_trade / row.start_balance
    # balance-weighted target of 1.5% / 1% / 0.5%
    accounts = {a.type: a for a in (await engine.get_portfolio(portfolio.id)).accounts}
    weighted = sum(RATES_BPS[t] * accounts[t].balance for t in accounts) / (10_000 * totals.balance)
    assert result.performance.target_weekly_return == pytest.approx(weighted)
    assert {s.account_id for s in result.accounts} == set(ids.values())

    assert without_accounts(await api.ok(f"/v1/portfolios/{portfolio.id}/analytics")) == \
        without_accounts(plain(result))
    windowed = await api.ok(f"/v1/portfolios/{portfolio.id}/analytics?weeks=8")
    assert without_accounts(windowed) == \
        without_accounts(plain(await direct_portfolio_analytics(engine, portfolio.id, weeks=8)))
    assert len(windowed["weekly_returns"]) == 8


async def test_portfolio_analytics_report_the_fork_trees_growth(database_url):
    """Small thresholds (fork at $1,000 of surplus, merge at $5,000): week 1 a Gen-Acc
    premium forks $1,000 into unit A, week 2 unit A's Com-Acc earns $4,000 and the unit merges its $5,000
    into the root's Com-Acc, week 3 a $1,200 premium forks unit B."""
    async with serving(database_url, fork_threshold_cents=1_000_00, merge_threshold_cents=5_000_00) as (engine, api):
        portfolio, opened, ids = await open_portfolio(engine, weeks_back=10, capital=10_000_00)
        await engine.book_trade(ids["generation"], kind="premium", amount=1_000_00,
                                effective_date=opened + timedelta(weeks=1))
        unit_a = (await engine.get_portfolio(portfolio.id)).units[0]
        unit_a_view = await engine.get_portfolio(unit_a.id)
        unit_a_com = next(a.id for a in unit_a_view.accounts if a.type == "compounding")
        await engine.book_trade(unit_a_com, kind="premium", amount=4_000_00,
                                effective_date=opened + timedelta(weeks=2))
        await engine.book_trade(ids["generation"], kind="premium", amount=1_200_00,
                                effective_date=opened + timedelta(weeks=3))
        await settled(engine)

        result = await engine.portfolio_analytics(portfolio.id)
        assert result.growth == analytics.Growth(units_created=2, units_merged=1, units_active=1,
                                                 forked_cents=2_200_00, merged_cents=5_000_00)
        assert result.balance == 10_000_00 + 6_200_00
        assert result.performance.income["net"] == 6_200_00
        assert len(result.accounts) == 3 + 2 + 2
        assert without_accounts(plain(result)) == \
            without_accounts(plain(await direct_portfolio_analytics(engine, portfolio.id)))
        # 3 weeks of strong premiums: the forecast sees the next fork coming
        assert result.forecast.weeks_to_next_fork is not None
        reply = await api.ok(f"/v1/portfolios/{portfolio.id}/analytics")
        assert reply["growth"] == {"units_created": 2, "units_merged": 1, "units_active": 1,
                                   "forked_cents": 2_200_00, "merged_cents": 5_000_00}
        # a unit's own analytics: its Gen-Acc is forecast towards the unit's merge
        unit_b = next(u for u in (await engine.get_portfolio(portfolio.id)).units if u.id != unit_a.id)
        unit_b_view = await engine.get_portfolio(unit_b.id)
        unit_b_gen = next(a.id for a in unit_b_view.accounts if a.type == "generation")
        own = await api.ok(f"/v1/accounts/{unit_b_gen}/analytics")
        assert own["forecast"]["weeks_to_merge"] is None  # it has not traded: no trend to merge on
        unit_result = await api.ok(f"/v1/portfolios/{unit_b.id}/analytics")
        assert unit_result["growth"]["units_created"] == 0 and unit_result["balance"] == 1_200_00

        # forks and merges move money inside the tree: each week's start balance is all of it
        rows = {r.week_start: r for r in result.weekly_returns}
        week = lambda n: analytics.week_of(opened + timedelta(weeks=n))
        assert [rows[week(n)].start_balance for n in (1, 2, 3, 4)] == [10_000_00, 11_000_00, 15_000_00, 16_200_00]
        assert rows[week(1)].weekly_return == 1_000_00 / 10_000_00
        assert rows[week(2)].weekly_return == 4_000_00 / 11_000_00
        assert rows[week(3)].weekly_return == 1_200_00 / 15_000_00


# -- the live drawdown_breach flag ----------------------------------------------------------
async def test_a_twelve_percent_loss_on_a_rev_acc_raises_one_breach_and_recovery_clears_it(service):
    engine, api = service
    portfolio, opened, ids = await open_portfolio(engine)
    rev = ids["revenue"]
    balance = await weekly_premiums(engine, rev, opened, range(1, 6), 100)
    assert engine.drawdown_breaches() == {} and await gauge(api) == 0.0

    loss = await engine.book_trade(rev, kind="loss", amount=balance * 12 // 100,
                                   effective_date=opened + timedelta(weeks=6))
    [breach] = await wait_for_drawdown_events(engine, rev, 1)
    assert breach.type == "account.drawdown_breach" and breach.portfolio_id == portfolio.id
    payload = msgspec.json.decode(breach.payload)
    assert payload["account_id"] == rev and payload["limit"] == 0.10
    # The analytics' `risk` names too (issue 12: event payloads use the REST names).
    assert payload["drawdown_limit"] == 0.10 and payload["flags"] == ["drawdown_breach"]
    assert payload["drawdown"] == pytest.approx(0.12, abs=1e-4)
    assert set(engine.drawdown_breaches()) == {rev}
    assert engine.drawdown_breaches()[rev] == pytest.approx(0.12, abs=1e-4)
    assert await gauge(api) == 1.0
    stored = await engine.store.fetch("SELECT account_id, flag FROM risk_flags")
    assert [(r["account_id"], r["flag"]) for r in stored] == [(rev, "drawdown_breach")]
    analysed = await api.ok(f"/v1/accounts/{rev}/analytics")
    assert analysed["risk"]["flags"] == ["drawdown_breach"]
    assert analysed["performance"]["current_drawdown"] == pytest.approx(0.12, abs=1e-4)
    assert (await api.ok(f"/v1/portfolios/{portfolio.id}/analytics"))["risk"]["flags"] == ["drawdown_breach"]

    # deeper still: no second event
    await engine.book_trade(rev, kind="loss", amount=loss.balance_after // 100,
                            effective_date=opened + timedelta(weeks=7))
    await settled(engine)
    assert len(await drawdown_events(engine, rev)) == 1
    assert set(engine.drawdown_breaches()) == {rev} and await gauge(api) == 1.0

    # a small premium is not enough (0.8712 * 1.01 of the peak)...
    balance = (await engine.get_account(rev)).balance
    small = await engine.book_trade(rev, kind="premium", amount=balance // 100,
                                    effective_date=opened + timedelta(weeks=8))
    await settled(engine)
    assert len(await drawdown_events(engine, rev)) == 1
    # ...a 4% week brings the index back within 10% of its peak (0.8712 * 1.01 * 1.04)
    await api.created(f"/v1/accounts/{rev}/trades", {"kind": "premium", "amount": small.balance_after * 4 // 100,
                                                     "effective_date": (opened + timedelta(weeks=9)).isoformat()})
    breach, recovered = await wait_for_drawdown_events(engine, rev, 2)
    assert recovered.type == "account.drawdown_recovered" and msgspec.json.decode(recovered.payload)["flags"] == []
    assert engine.drawdown_breaches() == {} and await gauge(api) == 0.0
    assert await engine.store.fetch("SELECT account_id FROM risk_flags") == []
    assert (await api.ok(f"/v1/accounts/{rev}/analytics"))["risk"]["flags"] == []
    await settled(engine)
    assert len(await drawdown_events(engine)) == 2


async def test_drawdown_checks_are_queued_coalesced_and_bounded(service):
    """Losses on many accounts at once: at most DRAWDOWN_CHECKERS checks run together
    (they read the ledger over the connection pool operators read through too), every
    breached account still gets its flag, and an account queued again before its check
    ran is checked once."""
    engine, _ = service
    revs = []
    for _ in range(4):
        _, opened, ids = await open_portfolio(engine)
        balance = await weekly_premiums(engine, ids["revenue"], opened, range(1, 3), 100)
        revs.append((ids["revenue"], balance, opened))
    await settled(engine)
    running = peak = 0
    checked: list[str] = []
    original = engine.risk.check_many

    async def counting(account_ids: list[str]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        checked.extend(account_ids)
        try:
            await original(account_ids)
        finally:
            running -= 1

    engine.risk.check_many = counting
    await asyncio.gather(*(engine.book_trade(rev, kind="loss", amount=balance * 12 // 100,
                                             effective_date=opened + timedelta(weeks=3))
                           for rev, balance, opened in revs))
    for rev, _, _ in revs:
        await wait_for_drawdown_events(engine, rev, 1)
    await settled(engine)
    assert set(engine.drawdown_breaches()) == {rev for rev, _, _ in revs}
    assert sorted(checked) == sorted(rev for rev, _, _ in revs)
    assert 1 <= peak <= DRAWDOWN_CHECKERS
    checked.clear()
    for _ in range(5):
        engine.risk.queue(revs[0][0])
    await settled(engine)
    assert checked == [revs[0][0]]
    assert len(await drawdown_events(engine, revs[0][0])) == 1   # still breached: no new event


async def test_a_check_frees_the_accounts_whose_flag_stays_while_another_flag_is_written(service, monkeypatch):
    """Two accounts checked together, one breached: while the breached one's flag waits
    for the writer, the other is free, and a check of it alone finishes meanwhile."""
    engine, _ = service
    _, opened, ids = await open_portfolio(engine)
    _, other_opened, other_ids = await open_portfolio(engine)
    rev, calm = ids["revenue"], other_ids["revenue"]
    balance = await weekly_premiums(engine, rev, opened, range(1, 3), 100)
    await weekly_premiums(engine, calm, other_opened, range(1, 3), 100)
    await settled(engine)
    monkeypatch.setattr(engine.risk, "after_trade", lambda account_id, kind: None)   # checked by hand below
    await engine.book_trade(rev, kind="loss", amount=balance * 12 // 100, effective_date=opened + timedelta(weeks=3))

    held = asyncio.get_running_loop().create_future()
    release = asyncio.Event()
    submit = engine.writer.submit

    def holding(op) -> None:
        if type(op).__name__ == "FlagOp" and not held.done():
            held.set_result(op)

            async def later() -> None:
                await release.wait()
                submit(op)

            asyncio.ensure_future(later())
            return
        submit(op)

    monkeypatch.setattr(engine.writer, "submit", holding)
    both = asyncio.ensure_future(engine.risk.check_many([rev, calm]))
    flag = await asyncio.wait_for(held, WAIT_S)
    assert flag.account_id == rev
    await asyncio.wait_for(engine.risk.check(calm), WAIT_S)   # not behind the breached account's write
    assert not both.done()
    release.set()
    await asyncio.wait_for(both, WAIT_S)
    assert set(engine.drawdown_breaches()) == {rev}


async def test_a_drawdown_check_that_fails_unexpectedly_does_not_strand_the_queue(service, monkeypatch):
    engine, _ = service
    checked: list[str] = []

    async def flaky(account_ids: list[str]) -> None:
        checked.extend(account_ids)
        if account_ids != ["acc_third"]:   # both checkers meet a failing check first
            raise RuntimeError("a bug in a check")

    monkeypatch.setattr(risk, "CHECK_BATCH_MAX", 1)   # one account per check, as each checker takes them
    engine.risk.check_many = flaky
    for account_id in ("acc_first", "acc_second", "acc_third"):
        engine.risk.queue(account_id)
    await settled(engine)
    assert checked == ["acc_first", "acc_second", "acc_third"]
    assert engine.risk.checkers == 0 and not engine.risk.due


async def test_the_flag_survives_a_restart_of_the_engine(database_url):
    async with serving(database_url) as (engine, api):
        _, opened, ids = await open_portfolio(engine)
        balance = await weekly_premiums(engine, ids["revenue"], opened, range(1, 3), 100)
        await engine.book_trade(ids["revenue"], kind="loss", amount=balance * 12 // 100,
                                effective_date=opened + timedelta(weeks=3))
        await wait_for_drawdown_events(engine, ids["revenue"], 1)
    async with serving(database_url) as (engine, api):
        assert set(engine.drawdown_breaches()) == {ids["revenue"]}
        assert await gauge(api) == 1.0
        await engine.account_analytics(ids["revenue"])  # re-checks: still breached, no new event
        await settled(engine)
        assert len(await drawdown_events(engine, ids["revenue"])) == 1


async def test_the_same_twelve_percent_loss_on_a_gen_acc_raises_nothing(service):
    engine, api = service
    _, opened, ids = await open_portfolio(engine)
    balance = await weekly_premiums(engine, ids["generation"], opened, range(1, 6), 100)
    await engine.book_trade(ids["generation"], kind="loss", amount=balance * 12 // 100,
                            effective_date=opened + timedelta(weeks=6))
    await settled(engine)
    analysed = await engine.account_analytics(ids["generation"])
    assert analysed.performance.current_drawdown == pytest.approx(0.12, abs=1e-4)
    assert analysed.risk.flags == []
    await settled(engine)
    assert await drawdown_events(engine) == []
    assert engine.drawdown_breaches() == {} and await gauge(api) == 0.0


async def test_a_loss_of_exactly_ten_percent_flags_a_rev_acc(service):
    """The flag is set when the drawdown *reaches* the limit (docs/analytics.md)."""
    engine, api = service
    _, opened, ids = await open_portfolio(engine)
    await engine.book_trade(ids["revenue"], kind="loss", amount=3_000_00, effective_date=opened + timedelta(weeks=1))
    await settled(engine)
    assert (await engine.account_analytics(ids["revenue"])).risk.flags == ["drawdown_breach"]
    await settled(engine)
    assert [e.type for e in await drawdown_events(engine, ids["revenue"])] == ["account.drawdown_breach"]


async def test_a_loss_larger_than_the_weeks_start_balance_is_a_drawdown_of_at_most_100_percent(service):
    """The Rev-Acc starts this week with $30,000, receives $100,000 today and loses $90,000
    today: r = -300%. Its drawdown (in the analytics and in the breach event) is still a
    share of the peak, at most 1."""
    engine, api = service
    _, opened, ids = await open_portfolio(engine, weeks_back=2)
    await engine.deposit(ids["revenue"], 100_000_00)
    await engine.book_trade(ids["revenue"], kind="loss", amount=90_000_00)
    [breach] = await wait_for_drawdown_events(engine, ids["revenue"], 1)
    analysed = await api.ok(f"/v1/accounts/{ids['revenue']}/analytics")
    assert 0 <= analysed["performance"]["max_drawdown"] <= 1, analysed["performance"]
    assert 0 <= msgspec.json.decode(breach.payload)["drawdown"] <= 1


@pytest.mark.parametrize("premium", [10_000_00, 10**13], ids=["forecast-past-the-balance-limit",
                                                              "annualized-return-overflow"])
async def test_analytics_of_an_extreme_but_legal_history_answer_200(service, premium):
    """A portfolio opened with 10 cents (Rev-Acc 3 cents) whose Rev-Acc books a $10,000 (or
    a $100 billion) premium the week after: a weekly return of millions of percent. Legal
    input; reads never fail."""
    engine, api = service
    portfolio, opened, ids = await open_portfolio(engine, weeks_back=2, capital=10)
    await engine.book_trade(ids["revenue"], kind="premium", amount=premium, effective_date=opened + timedelta(weeks=1))
    reply = await api.get(f"/v1/accounts/{ids['revenue']}/analytics")  # Api.call fails on a 500
    assert reply.status == 200, reply.body
    reply = await api.get(f"/v1/portfolios/{portfolio.id}/analytics")
    assert reply.status == 200, reply.body


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["accounts", "portfolios"])
async def test_analytics_of_an_unknown_id_is_404(service, route):
    engine, api = service
    prefix = "acc" if route == "accounts" else "prt"
    missing = f"{prefix}_{uuid.uuid4().hex[:28]}"
    assert_error(await api.get(f"/v1/{route}/{missing}/analytics"), 404, "not_found")
    with pytest.raises(NotFound):
        if route == "accounts":
            await engine.account_analytics(missing)
        else:
            await engine.portfolio_analytics(missing)


@pytest.mark.parametrize("weeks", ["0", "521", "abc", "-1", "", "1.5", "9999999", "%201"])
async def test_a_window_outside_1_to_520_weeks_is_422_on_both_routes(service, weeks):
    engine, api = service
    portfolio, _, ids = await open_portfolio(engine)
    for path in (f"/v1/accounts/{ids['revenue']}/analytics", f"/v1/portfolios/{portfolio.id}/analytics"):
        assert_error(await api.get(f"{path}?weeks={weeks}"), 422, "validation_failed", "weeks")


async def test_the_window_bounds_1_and_520_are_accepted(service):
    engine, api = service
    portfolio, _, ids = await open_portfolio(engine)
    for weeks in (1, 520):
        account = await api.ok(f"/v1/accounts/{ids['revenue']}/analytics?weeks={weeks}")
        assert len(account["weekly_returns"]) == min(weeks, 21)
        await api.ok(f"/v1/portfolios/{portfolio.id}/analytics?weeks={weeks}")


@pytest.mark.parametrize("weeks", [0, 521, -1, True, "4", 2.0])
async def test_the_embedding_api_refuses_a_bad_window(service, weeks):
    engine, _ = service
    portfolio, _, ids = await open_portfolio(engine)
    with pytest.raises(ValidationFailed) as caught:
        await engine.account_analytics(ids["revenue"], weeks=weeks)
    assert caught.value.details == {"field": "weeks"}
    with pytest.raises(ValidationFailed):
        await engine.portfolio_analytics(portfolio.id, weeks=weeks)


async def test_effective_dates_in_the_future_before_the_latest_or_before_the_opening_are_422(service):
    engine, api = service
    _, opened, ids = await open_portfolio(engine, weeks_back=4)
    rev = ids["revenue"]
    path = f"/v1/accounts/{rev}/trades"
    await api.created(path, {"kind": "premium", "amount": 100_00,
                             "effective_date": (opened + timedelta(weeks=2)).isoformat()})
    before = await engine.get_account(rev)
    cases = {
        "future": (today() + timedelta(days=1)).isoformat(),
        "far future": "2999-01-01",
        "before the latest": (opened + timedelta(weeks=2, days=-1)).isoformat(),
        "before the opening": (opened - timedelta(days=1)).isoformat(),
    }
    for effective in cases.values():
        for kind in ("premium", "loss", "fee"):
            reply = await api.post(path, {"kind": kind, "amount": 1_00, "effective_date": effective},
                                   key=str(uuid.uuid4()))
            assert_error(reply, 422, "validation_failed", "effective_date")
    for malformed in ("2026-13-01", "yesterday", 20260101, "2026-01-01T00:00:00Z"):
        reply = await api.post(path, {"kind": "premium", "amount": 1_00, "effective_date": malformed})
        assert reply.status == 422, (malformed, reply.body)
        assert reply.body["error"]["code"] == "validation_failed"
    for effective in (today() + timedelta(days=1), opened - timedelta(days=1)):
        with pytest.raises(Refused) as caught:
            await engine.book_trade(rev, kind="premium", amount=1_00, effective_date=effective)
        assert caught.value.code == "validation_failed" and caught.value.details == {"field": "effective_date"}
    after = await engine.get_account(rev)
    assert (after.balance, after.version, after.latest_effective_date) == \
        (before.balance, before.version, opened + timedelta(weeks=2))


async def test_an_effective_date_before_a_later_entry_of_any_kind_is_422(service):
    """Other entries take the day they are made: after today's deposit, no trade may be
    dated before today."""
    engine, api = service
    _, opened, ids = await open_portfolio(engine, weeks_back=4)
    await engine.deposit(ids["revenue"], 100_00)
    reply = await api.post(f"/v1/accounts/{ids['revenue']}/trades",
                           {"kind": "premium", "amount": 100_00,
                            "effective_date": (opened + timedelta(weeks=1)).isoformat()})
    assert_error(reply, 422, "validation_failed", "effective_date")


async def test_opened_on_in_the_future_is_422_for_portfolios_and_accounts(service):
    engine, api = service
    tomorrow = (today() + timedelta(days=1)).isoformat()
    reply = await api.post("/v1/portfolios", {"name": "P", "owner": "ann", "initial_capital": CAPITAL,
                                              "opened_on": tomorrow})
    assert_error(reply, 422, "validation_failed", "opened_on")
    reply = await api.post("/v1/accounts", {"name": "A", "type": "revenue", "owner": "ann", "opened_on": tomorrow})
    assert_error(reply, 422, "validation_failed", "opened_on")
    for malformed in ("soon", "2026-02-30"):
        reply = await api.post("/v1/portfolios", {"name": "P", "owner": "ann", "initial_capital": CAPITAL,
                                                  "opened_on": malformed})
        assert reply.status == 422 and reply.body["error"]["code"] == "validation_failed", reply.body
    with pytest.raises(Refused) as caught:
        await engine.create_portfolio(name="P", owner="ann", initial_capital=CAPITAL,
                                      opened_on=today() + timedelta(days=1))
    assert caught.value.code == "validation_failed"
    with pytest.raises(Refused) as caught:
        await engine.create_account(name="A", type="revenue", owner="ann", opened_on=today() + timedelta(days=1))
    assert caught.value.code == "validation_failed"
    assert (await engine.list_accounts()).items == []
    # today and any day before are fine
    account = await api.created("/v1/accounts", {"name": "A", "type": "revenue", "owner": "ann",
                                                 "opened_on": today().isoformat()})
    assert account["id"]


# -- the reference libraries (issue 15) ----------------------------------------------------
SEASON_BPS = [180, -420, 95, 130, -610, 240, 70, -150, 310, -40, 0, 55, -280, 120, 85,
              -520, 160, 45, -90, 200, -330, 110, 60, -700, 150, 20, -60, 90, -410, 130]


async def test_a_30_week_rev_acc_booked_by_effective_date_matches_empyrical_over_http(database_url):
    """The issue's test: a Rev-Acc with 30 weeks of known premiums and losses, the first
    in the opening week, booked with effective dates, and this week a deposit before the
    last trade. Every measure over HTTP equals the library's on the known weekly returns
    (each trade over the capital it was booked against; this week's capital counts the
    deposit from the day it landed), with a risk-free and a required return configured.
    The portfolio's measures equal the library's on the portfolio's weekly returns."""
    from analytics_reference import assert_matches_reference

    rates = {"risk_free_rate": 0.04, "required_return": 0.02}
    async with serving(database_url, analytics_settings=rates) as (engine, api):
        portfolio, opened, ids = await open_portfolio(engine, weeks_back=len(SEASON_BPS) - 1)
        total = (await engine.get_portfolio(portfolio.id)).totals.balance
        deposit = 1_234_56
        weight = Fraction(7 - today().weekday(), 7)
        known, portfolio_known = [], []
        balance = (await engine.get_account(ids["revenue"])).balance
        for week, bps in enumerate(SEASON_BPS):
            capital, portfolio_capital = Fraction(balance), Fraction(total)
            if week == len(SEASON_BPS) - 1:
                await engine.deposit(ids["revenue"], deposit)
                capital, portfolio_capital = capital + deposit * weight, portfolio_capital + deposit * weight
            amount = balance * abs(bps) // 10_000
            net = amount if bps >= 0 else -amount
            known.append(float(net / capital))
            portfolio_known.append(float(net / portfolio_capital))
            if amount:  # a flat week books nothing
                trade = await engine.book_trade(ids["revenue"], kind="premium" if bps >= 0 else "loss",
                                                amount=amount, effective_date=opened + timedelta(weeks=week))
                total += trade.balance_after - balance
                balance = trade.balance_after
        await settled(engine)
        reply = await api.ok(f"/v1/accounts/{ids['revenue']}/analytics")
        assert reply["performance"]["weeks"] == 30  # the opening week counts
        assert [r["weekly_return"] for r in reply["weekly_returns"]] == pytest.approx(known, rel=1e-12)
        assert_matches_reference(reply["performance"], known, **rates)
        whole = await api.ok(f"/v1/portfolios/{portfolio.id}/analytics")
        assert [r["weekly_return"] for r in whole["weekly_returns"]] == pytest.approx(portfolio_known, rel=1e-12)
        assert_matches_reference(whole["performance"], portfolio_known, **rates)
        # in-process, the very same figures
        assert plain(await engine.account_analytics(ids["revenue"])) == reply


async def test_openapi_describes_every_analytics_field_the_routes_answer(service):
    """The new measures and the Modified Dietz columns are in /openapi.json (generated
    from the same Structs), as required fields: each reply has exactly the documented
    keys, for accounts and for portfolios."""
    engine, api = service
    portfolio, opened, ids = await open_portfolio(engine, weeks_back=3)
    await weekly_premiums(engine, ids["revenue"], opened, range(0, 4), 100)
    schemas = (await api.get("/openapi.json", token=None)).body["components"]["schemas"]
    performance, week = schemas["Performance"], schemas["WeekReturn"]
    for name in ("sharpe", "return_over_volatility", "sortino", "calmar", "value_at_risk_95",
                 "conditional_value_at_risk_95", "best_week", "worst_week", "win_rate",
                 "max_drawdown_duration_weeks", "time_to_recovery_weeks", "skew", "kurtosis", "risk_free_rate",
                 "required_return"):
        assert name in performance["required"], name
    for name in ("flow", "flow_cent_days", "first_inflow_weekday", "average_capital"):
        assert name in week["required"], name
    for path in (f"/v1/accounts/{ids['revenue']}/analytics", f"/v1/portfolios/{portfolio.id}/analytics"):
        reply = await api.ok(path)
        assert set(reply["performance"]) == set(performance["properties"])
        assert all(set(row) == set(week["properties"]) for row in reply["weekly_returns"])
