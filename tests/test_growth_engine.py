"""The growth rules live: portfolios, forks, merges, reinvestment and their events through
the real account actors, supervisors, writer and PostgreSQL (one database per test),
driven through the embedding API. Also: the live rules agree with the projection, the
outbox survives a restart, and crashed actors heal under load (or are quarantined)."""
from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import date

import asyncpg
import msgspec
import pytest
import pytest_asyncio

from actors.api import Engine
from actors.settings import load_settings
from engine.errors import Refused, Unavailable
from engine.growth import weekly_premium
from engine.projection import project
from engine.rules import quarter_of
from tests.conftest import eventually

# Small thresholds so that a few premiums fork and merge: fork at $1,000, merge at $5,000.
FORK = 1_000_00
MERGE = 5_000_00


def growth_settings(database_url: str, *, fork: int = FORK, merge: int = MERGE, fault_injection: bool = False,
                    restarts_max: int = 3, window_s: float = 60.0, **engine):
    return load_settings({}, {
        "database": {"url": database_url},
        "rules": {"fork_threshold_cents": fork, "merge_threshold_cents": merge},
        # The quarterly schedule would reinvest in the background; these tests ask for it.
        "engine": {"fault_injection": fault_injection, "reinvest_schedule": False, **engine},
        "supervision": {"restarts_max": restarts_max, "window_s": window_s},
    })


@pytest_asyncio.fixture(loop_scope="session")
async def growth(database_url):
    started = Engine(growth_settings(database_url))
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


# -- helpers -------------------------------------------------------------------------------------


async def _async(value):
    """`value` as an awaitable, for `eventually` probes that need no I/O."""
    return value


async def all_events(engine: Engine, after: int = 0) -> list:
    events = []
    while True:
        page = await engine.events_page(after=after, limit=500)
        events += page
        if len(page) < 500:
            return events
        after = page[-1].seq


async def last_seq(engine: Engine) -> int:
    rows = await engine.store.fetch("SELECT coalesce(max(seq), 0) AS seq FROM events")
    return rows[0]["seq"]


def of_type(events, kind: str) -> list:
    return [e for e in events if e.type == kind]


def payload(event) -> dict:
    return msgspec.json.decode(event.payload)


def by_type(view) -> dict:
    return {a.type: a for a in view.accounts}


async def checked_books(engine: Engine) -> dict[str, int]:
    """Every account in the database: balance >= 0, balance == the sum of its entries, and
    each entry's balance_after the running sum. Returns the balances."""
    rows = await engine.store.fetch("SELECT id, balance FROM accounts")
    balances = {row["id"]: row["balance"] for row in rows}
    entries = await engine.store.fetch(
        "SELECT account_id, direction, amount, balance_after FROM entries ORDER BY account_id, sequence")
    running = dict.fromkeys(balances, 0)
    for entry in entries:
        running[entry["account_id"]] += entry["amount"] if entry["direction"] == "credit" else -entry["amount"]
        assert entry["balance_after"] == running[entry["account_id"]] >= 0, dict(entry)
    assert running == balances
    return balances


async def root_portfolio(engine: Engine, capital: int = 10_000_00, name: str = "p"):
    view = await engine.create_portfolio(name=name, owner="ann", initial_capital=capital)
    return view, by_type(view)


async def fork_once(engine: Engine, generation_id: str, surplus: int = 1_500_00):
    """A premium that takes the Gen-Acc `surplus` over its baseline (>= the threshold)."""
    await engine.book_trade(generation_id, kind="premium", amount=surplus)


async def only_unit(engine: Engine, portfolio_id: str):
    view = await engine.get_portfolio(portfolio_id)
    [unit] = view.units
    return by_type(await engine.get_portfolio(unit.id)), unit.id


# -- portfolios, forks, merges -------------------------------------------------------------------

async def test_creating_a_portfolio_splits_the_capital_and_reports_totals(growth):
    view, accounts = await root_portfolio(growth, capital=1_000_009)
    assert (accounts["generation"].balance, accounts["revenue"].balance, accounts["compounding"].balance) == (
        400_003, 300_002, 300_004)
    assert accounts["generation"].baseline == 400_003
    assert view.totals.balance == 1_000_009 and view.parent_id is None and view.root_id == view.id
    again = await growth.get_portfolio(view.id)
    assert again.totals == view.totals and again.units == []
    tree = await growth.portfolio_tree(view.id)
    assert [node.id for node in tree.nodes] == [view.id]
    assert (tree.units_active, tree.units_merged, tree.totals.balance) == (0, 0, 1_000_009)
    assert (await checked_books(growth)) == {a.id: a.balance for a in view.accounts}
    events = await all_events(growth)
    assert Counter(e.type for e in events) == {"portfolio.opened": 1, "account.opened": 3, "transaction.posted": 3}
    assert events[0].type == "portfolio.opened", "the portfolio's event precedes its accounts'"


async def test_a_premium_crossing_the_threshold_forks_before_the_call_returns(growth):
    view, accounts = await root_portfolio(growth)
    generation = accounts["generation"]
    assert generation.balance == 4_000_00
    quiet = await growth.book_trade(generation.id, kind="premium", amount=FORK - 1)
    assert quiet.growth is None
    assert (await growth.get_portfolio(view.id)).units == []
    posted = await growth.book_trade(generation.id, kind="premium", amount=500_01)  # surplus 1,500.00
    assert posted.kind == "premium" and posted.balance_after == 5_500_00

    assert (await growth.get_account(generation.id)).balance == 4_000_00
    unit_accounts, unit_id = await only_unit(growth, view.id)
    assert unit_accounts.keys() == {"generation", "compounding"}
    assert unit_accounts["generation"].balance == unit_accounts["generation"].baseline == 750_00
    assert unit_accounts["compounding"].balance == 750_00
    # The reply says so: the strategy engine need not poll the tree.
    assert posted.growth is not None and posted.growth.unit_id == unit_id and posted.growth.merge_id is None
    tree = await growth.portfolio_tree(view.id)
    assert [node.id for node in tree.nodes] == [view.id, unit_id]
    assert tree.nodes[0].children == [unit_id] and tree.nodes[1].parent_id == view.id
    assert (tree.units_active, tree.totals.balance) == (1, 10_000_00 + 1_500_00)

    forked = of_type(await all_events(growth), "portfolio.forked")
    assert len(forked) == 1
    assert forked[0].correlation_id == posted.growth.fork_id
    assert payload(forked[0])["amount"] == 1_500_00
    assert payload(forked[0])["from_account"] == generation.id
    legs = await growth.store.fetch("SELECT account_id, direction, amount FROM entries WHERE correlation_id = $1",
                                    forked[0].correlation_id)
    assert sorted((r["account_id"], r["direction"], r["amount"]) for r in legs) == sorted([
        (generation.id, "debit", 1_500_00), (unit_accounts["generation"].id, "credit", 750_00),
        (unit_accounts["compounding"].id, "credit", 750_00)])
    await checked_books(growth)


@pytest.mark.parametrize("credit", ["premium", "deposit", "transfer"])
async def test_a_credit_bringing_a_unit_to_the_merge_threshold_merges_before_the_call_returns(growth, credit):
    view, accounts = await root_portfolio(growth)
    await fork_once(growth, accounts["generation"].id)
    unit_accounts, unit_id = await only_unit(growth, view.id)
    target = unit_accounts["compounding"].id
    missing = MERGE - 1_500_00
    if credit == "premium":
        reply = await growth.book_trade(target, kind="premium", amount=missing)
    elif credit == "deposit":
        reply = await growth.deposit(target, missing)
    else:
        await growth.deposit(accounts["revenue"].id, missing)
        reply = await growth.transfer(accounts["revenue"].id, target, missing)

    unit = await growth.get_portfolio(unit_id)
    assert unit.status == "merged" and unit.merged_at is not None
    for account in unit.accounts:
        assert (account.status, account.balance) == ("merged", 0)
    root_compounding = await growth.get_account(accounts["compounding"].id)
    assert root_compounding.balance == 3_000_00 + MERGE
    tree = await growth.portfolio_tree(view.id)
    assert (tree.units_active, tree.units_merged) == (0, 1)
    total = 10_000_00 + 1_500_00 + missing
    assert tree.totals.balance == total == sum((await checked_books(growth)).values())
    merged = of_type(await all_events(growth), "portfolio.merged")
    assert len(merged) == 1 and merged[0].portfolio_id == unit_id
    # The credit's reply names the merge that followed it.
    assert reply.growth is not None and reply.growth.merge_id == merged[0].correlation_id
    assert reply.growth.fork_id is None
    assert payload(merged[0])["amount"] == MERGE and payload(merged[0])["to_account"] == accounts["compounding"].id
    # The merged accounts take nothing more.
    with pytest.raises(Refused) as caught:
        await growth.deposit(target, 1)
    assert caught.value.code == "account_not_active"


async def test_concurrent_credits_crossing_the_merge_threshold_merge_the_unit_exactly_once(growth):
    view, accounts = await root_portfolio(growth)
    await fork_once(growth, accounts["generation"].id)
    unit_accounts, unit_id = await only_unit(growth, view.id)
    # The unit holds 1,500.00 and needs 3,500.00 more. Two credits to its Gen-Acc stay
    # below its fork threshold (its baseline is 750.00), so nothing forks off meanwhile.
    targets = [unit_accounts["compounding"].id] * 10 + [unit_accounts["generation"].id] * 2

    async def credit(account_id):
        try:
            return await growth.deposit(account_id, 400_00)
        except Refused as refusal:
            assert refusal.code == "account_not_active"  # it arrived after the merge
            return None

    done = [t for t in await asyncio.gather(*(credit(a) for a in targets)) if t is not None]
    assert len(done) >= 9, "the unit needs nine credits to merge"
    assert (await growth.get_portfolio(unit_id)).status == "merged"
    assert len(of_type(await all_events(growth), "portfolio.merged")) == 1
    balances = await checked_books(growth)
    assert sum(balances.values()) == 10_000_00 + 1_500_00 + 400_00 * len(done)
    assert balances[accounts["compounding"].id] == 3_000_00 + 1_500_00 + 400_00 * len(done)


async def test_a_manual_fork_moves_at_most_the_surplus_and_a_manual_merge_empties_the_unit(growth):
    view, accounts = await root_portfolio(growth)
    generation_id = accounts["generation"].id
    await growth.book_trade(generation_id, kind="premium", amount=500_00)  # below the threshold: no fork
    with pytest.raises(Refused) as caught:
        await growth.fork(generation_id, amount=500_01)  # one cent more than the surplus
    assert caught.value.code == "fork_not_allowed"
    for account_id in (accounts["revenue"].id, accounts["compounding"].id):
        with pytest.raises(Refused) as caught:
            await growth.fork(account_id)
        assert caught.value.code == "fork_not_allowed"

    operation = await growth.fork(generation_id, amount=300_01, idempotency_key="fork-1")
    assert (operation.kind, operation.amount) == ("fork", 300_01)
    again = await growth.fork(generation_id, amount=300_01, idempotency_key="fork-1")
    assert again == operation, "the same key returns the original fork without forking again"
    assert (await growth.get_account(generation_id)).balance == 4_000_00 + 500_00 - 300_01
    unit = await growth.get_portfolio(operation.portfolio_id)
    assert unit.parent_id == view.id
    assert (by_type(unit)["generation"].balance, by_type(unit)["compounding"].balance) == (150_00, 150_01)

    merge = await growth.merge_portfolio(unit.id)
    assert (merge.kind, merge.portfolio_id, merge.amount) == ("merge", unit.id, 300_01)
    assert (await growth.get_account(accounts["compounding"].id)).balance == 3_000_00 + 300_01
    assert all(a.status == "merged" and a.balance == 0 for a in (await growth.get_portfolio(unit.id)).accounts)
    for portfolio_id in (unit.id, view.id):  # a merged unit, a root
        with pytest.raises(Refused) as caught:
            await growth.merge_portfolio(portfolio_id)
        assert caught.value.code == "merge_not_allowed"
    events = await all_events(growth)
    assert len(of_type(events, "portfolio.forked")) == 1 and len(of_type(events, "portfolio.merged")) == 1
    assert of_type(events, "portfolio.forked")[0].correlation_id == operation.id
    assert of_type(events, "portfolio.merged")[0].correlation_id == merge.id
    assert sum((await checked_books(growth)).values()) == 10_000_00 + 500_00


async def test_a_portfolio_reinvests_once_per_quarter_then_refuses_as_already_reinvested(growth):
    view, accounts = await root_portfolio(growth)
    revenue_id, compounding_id = accounts["revenue"].id, accounts["compounding"].id
    await growth.book_trade(revenue_id, kind="premium", amount=100_00)
    await growth.book_trade(revenue_id, kind="loss", amount=20_00)
    await growth.book_trade(revenue_id, kind="fee", amount=1)
    await growth.book_trade(compounding_id, kind="premium", amount=40_00)
    await growth.book_trade(accounts["generation"].id, kind="premium", amount=10_00)
    balances = await checked_books(growth)
    quarter = quarter_of(growth.clock().date())

    report = await growth.reinvest_portfolio(view.id, quarter)
    done = {a.account_id: (a.net_income, a.contracts, a.leaps) for a in report.accounts}
    assert done == {revenue_id: (79_99, 59_99, 20_00), compounding_id: (40_00, 30_00, 10_00)}
    revenue = await growth.get_account(revenue_id)
    assert (revenue.allocations.contracts, revenue.allocations.leaps) == (59_99, 20_00)
    assert revenue.last_reinvested_quarter == quarter and revenue.trade_income_cents == 0

    with pytest.raises(Refused) as caught:
        await growth.reinvest_portfolio(view.id, quarter)
    assert caught.value.code == "already_reinvested"
    assert await checked_books(growth) == balances, "reinvestment moves no money"
    assert (await growth.get_account(revenue_id)) == revenue
    assert len(of_type(await all_events(growth), "account.reinvested")) == 2
    rows = await growth.store.fetch("SELECT account_id FROM reinvestments")
    assert sorted(r["account_id"] for r in rows) == sorted([revenue_id, compounding_id])


async def test_compounding_accounts_refuse_withdrawals_and_transfers_out(growth):
    view, accounts = await root_portfolio(growth)
    await fork_once(growth, accounts["generation"].id)
    unit_accounts, _ = await only_unit(growth, view.id)
    balances = await checked_books(growth)
    for compounding_id in (accounts["compounding"].id, unit_accounts["compounding"].id):
        with pytest.raises(Refused) as caught:
            await growth.withdraw(compounding_id, 1)
        assert caught.value.code == "withdrawal_not_allowed"
        with pytest.raises(Refused) as caught:
            await growth.transfer(compounding_id, accounts["revenue"].id, 1)
        assert caught.value.code == "withdrawal_not_allowed"
    assert await checked_books(growth) == balances
    # Money still flows in.
    await growth.transfer(accounts["revenue"].id, accounts["compounding"].id, 1)


# -- the live rules agree with the projection ----------------------------------------------------

LIVE_FORK, LIVE_MERGE = 80_000, 240_000
LIVE_RATES = {"generation": 1_000, "revenue": 100, "compounding": 500}
LIVE_CAPITAL, LIVE_WEEKS = 1_000_000, 24
# The live side books every premium today; the projection's dates do not affect balances.
PROJECTION_START = date(2026, 1, 5)


async def test_driving_a_portfolio_with_the_projected_premiums_ends_with_the_projected_tree(database_url):
    """Week by week, every account active at the week's start, in creation order (units
    forked during the week come after the existing accounts and start next week), books
    `weekly_premium` of its current balance through the engine; forks and merges happen
    live. Each week's totals by type, forks, merges and active units must equal the
    projection's, computed by `project()` with the same rules."""
    settings = growth_settings(database_url, fork=LIVE_FORK, merge=LIVE_MERGE)
    rules = settings.rules
    expected = project(initial_capital=LIVE_CAPITAL, weeks=LIVE_WEEKS, weekly_return_bps=LIVE_RATES,
                       start=PROJECTION_START, rules=rules)
    assert expected.units_created >= 6 and expected.units_merged >= 2, "the scenario must fork and merge"

    async with Engine(settings) as engine:
        view = await engine.create_portfolio(name="live", owner="ann", initial_capital=LIVE_CAPITAL)
        accounts = by_type(view)
        order = [accounts[t].id for t in ("generation", "revenue", "compounding")]
        cursor = await last_seq(engine)
        for week in expected.weeks:
            forks = merges = 0
            active = [i for i in order if (await engine.get_account(i)).status == "active"]
            for account_id in active:
                account = await engine.get_account(account_id)
                if account.status != "active":
                    continue  # merged earlier this week
                premium = weekly_premium(account.balance, rules.cash_buffer_bps[account.type],
                                         LIVE_RATES[account.type])
                if premium <= 0:
                    continue
                await engine.book_trade(account_id, kind="premium", amount=premium)
                new = await all_events(engine, cursor)
                if new:
                    cursor = new[-1].seq
                for event in of_type(new, "portfolio.forked"):
                    unit = payload(event)["portfolio"]
                    order += [unit["generation_account_id"], unit["compounding_account_id"]]
                    forks += 1
                merges += len(of_type(new, "portfolio.merged"))
            tree = await engine.portfolio_tree(view.id)
            live = (tree.totals.generation, tree.totals.revenue, tree.totals.compounding, tree.totals.balance,
                    forks, merges, tree.units_active)
            projected = (week.generation, week.revenue, week.compounding, week.total_value, week.forks,
                         week.merges, week.active_units)
            assert live == projected, f"week {week.week}: live {live} != projected {projected}"

        tree = await engine.portfolio_tree(view.id)
        assert len(tree.nodes) - 1 == expected.units_created
        assert tree.units_merged == expected.units_merged
        assert tree.totals.balance == expected.final_total_value
        assert max(node.depth for node in tree.nodes) >= 2, "units forked units of their own"
        balances = await checked_books(engine)
        assert sum(balances.values()) == expected.final_total_value


# -- events --------------------------------------------------------------------------------------

async def test_every_committed_fork_and_merge_has_exactly_one_event_also_after_a_restart(database_url):
    settings = growth_settings(database_url)
    engine = Engine(settings)
    await engine.start()
    try:
        view, accounts = await root_portfolio(engine)
        generation_id = accounts["generation"].id
        for _ in range(3):
            await fork_once(engine, generation_id)                       # three automatic forks
        await engine.book_trade(generation_id, kind="premium", amount=200_00)
        await engine.fork(generation_id, amount=100_00)                  # and a manual one
        units = (await engine.get_portfolio(view.id)).units
        assert len(units) == 4
        first = by_type(await engine.get_portfolio(units[0].id))
        await engine.book_trade(first["compounding"].id, kind="premium", amount=MERGE)   # an automatic merge
        await engine.merge_portfolio(units[1].id)                                         # a manual one
        with pytest.raises(Refused):
            await engine.merge_portfolio(units[1].id)                                     # refused: no event
        with pytest.raises(Refused):
            await engine.fork(generation_id, amount=10**9)                                # refused: no event
        before = await all_events(engine)
    finally:
        await engine.stop()

    fork_ids = {r["correlation_id"] for r in await _rows(database_url, "SELECT DISTINCT correlation_id FROM entries "
                                                                        "WHERE kind = 'fork'")}
    merge_ids = {r["correlation_id"] for r in await _rows(database_url, "SELECT DISTINCT correlation_id FROM "
                                                                         "entries WHERE kind = 'merge'")}
    assert len(fork_ids) == 4 and len(merge_ids) == 2
    forked, merged = of_type(before, "portfolio.forked"), of_type(before, "portfolio.merged")
    assert sorted(e.correlation_id for e in forked) == sorted(fork_ids)
    assert sorted(e.correlation_id for e in merged) == sorted(merge_ids)
    assert sorted(e.portfolio_id for e in forked) == sorted(u.id for u in units)
    seqs = [e.seq for e in before]
    assert seqs == sorted(set(seqs)), "sequence numbers are unique and ascending"

    engine = Engine(settings)
    await engine.start()
    try:
        after_restart = await all_events(engine)
        assert [(e.seq, e.type, e.correlation_id, e.portfolio_id) for e in after_restart] == [
            (e.seq, e.type, e.correlation_id, e.portfolio_id) for e in before]
        # The feed goes on from where it was, without repeating anything.
        await fork_once(engine, generation_id)
        new = await all_events(engine, before[-1].seq)
        assert len(of_type(new, "portfolio.forked")) == 1 and min(e.seq for e in new) > before[-1].seq
        assert len(of_type(await all_events(engine), "portfolio.forked")) == 5
    finally:
        await engine.stop()


async def _rows(database_url: str, sql: str):
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetch(sql)
    finally:
        await connection.close()


async def test_the_event_iterator_and_a_subscription_deliver_new_fork_and_merge_events(growth):
    view, accounts = await root_portfolio(growth)
    start = await last_seq(growth)
    iterated, delivered = [], []

    async def iterate():
        async for event in growth.events(after=start):
            iterated.append(event)

    async def on_event(event):
        delivered.append(event)

    iterator_task = asyncio.create_task(iterate())
    subscription = growth.subscribe(on_event, after=start)
    try:
        await fork_once(growth, accounts["generation"].id)
        unit_accounts, unit_id = await only_unit(growth, view.id)
        await growth.book_trade(unit_accounts["compounding"].id, kind="premium", amount=MERGE)

        def kinds(events):
            return [e.type for e in events if e.type in ("portfolio.forked", "portfolio.merged")]

        for seen in (iterated, delivered):
            await eventually(lambda: _async(kinds(seen) == ["portfolio.forked", "portfolio.merged"]),
                             what="the fork and merge events")
        expected = await all_events(growth, start)
        await eventually(lambda: _async(len(iterated) == len(delivered) == len(expected)), what="every event")
        assert [e.seq for e in iterated] == [e.seq for e in delivered] == [e.seq for e in expected]
        assert of_type(iterated, "portfolio.merged")[0].portfolio_id == unit_id
    finally:
        iterator_task.cancel()
        subscription.cancel()
        await asyncio.gather(iterator_task, subscription, return_exceptions=True)


# -- self-healing under load ---------------------------------------------------------------------

CLIENTS, CRASHES_PER_ACCOUNT_MAX, CRASHES_TOTAL = 8, 2, 16
# Each client goes on until the crasher is done, within these bounds.
OPERATIONS_PER_CLIENT_MIN, OPERATIONS_PER_CLIENT_MAX = 20, 2_000
RETRY_FOR_S = 30.0


async def test_crashed_actors_heal_under_load_and_repeated_crashes_quarantine(database_url):
    settings = growth_settings(database_url, fault_injection=True, restarts_max=3, window_s=60.0,
                               operation_timeout_s=5.0)
    async with Engine(settings) as engine:
        portfolios = [await root_portfolio(engine, capital=1_000_00, name=f"p{i}") for i in range(2)]
        standalone = [await engine.create_account(name=f"s{i}", type="revenue", owner="ann") for i in range(4)]
        for account in standalone:
            await engine.deposit(account.id, 500_00)
        ids = [a.id for _, accounts in portfolios for a in accounts.values()] + [a.id for a in standalone]
        compounding = {accounts["compounding"].id for _, accounts in portfolios}
        sources = [i for i in ids if i not in compounding]
        initial = sum((await checked_books(engine)).values())
        loop = asyncio.get_running_loop()

        acknowledged: list = []
        refused: list[str] = []
        retries = Counter()

        async def with_retries(key: str, call):
            """A 503 is safe to retry with the same idempotency key: retry until it lands."""
            deadline = loop.time() + RETRY_FOR_S
            while True:
                try:
                    return await call()
                except Unavailable as error:
                    retries[error.code] += 1
                    if loop.time() > deadline:
                        raise AssertionError(f"operation {key} never got through: {error.code}") from error
                    await asyncio.sleep(0.005)

        stop = asyncio.Event()
        attempted = Counter()

        async def client(number: int) -> None:
            rng = random.Random(number)
            for n in range(OPERATIONS_PER_CLIENT_MAX):
                if stop.is_set() and n >= OPERATIONS_PER_CLIENT_MIN:
                    return
                attempted[number] += 1
                key = f"c{number}-{n}"
                if rng.random() < 0.3:
                    target, amount = rng.choice(ids), rng.randint(1, 1_000)
                    call = lambda: engine.deposit(target, amount, idempotency_key=key)  # noqa: E731
                else:
                    source = rng.choice(sources)
                    target = rng.choice([i for i in ids if i != source])
                    amount = rng.randint(1, 5_000)
                    call = lambda: engine.transfer(source, target, amount, idempotency_key=key)  # noqa: E731
                try:
                    acknowledged.append(await with_retries(key, call))
                except Refused as refusal:
                    assert refusal.code == "insufficient_funds", refusal.code
                    refused.append(key)

        crashes = Counter()

        async def crasher() -> None:
            rng = random.Random(99)
            while sum(crashes.values()) < CRASHES_TOTAL:
                candidates = [i for i in ids if crashes[i] < CRASHES_PER_ACCOUNT_MAX]
                if not candidates:
                    return
                account_id = rng.choice(candidates)
                await engine.inject_fault(account_id)
                armed = engine.registry.peek(account_id).ref
                crashes[account_id] += 1
                # The armed fault fires on the account's next message, normally a client's;
                # a read makes sure it has fired before the next account is armed.
                try:
                    await eventually(lambda: _async(not armed.is_alive()), timeout_s=0.3)
                except AssertionError:
                    try:
                        await engine.get_account(account_id)
                    except Unavailable:
                        pass
                assert not armed.is_alive()

        async def crash_then_stop() -> None:
            try:
                await crasher()
            finally:
                stop.set()

        await asyncio.gather(crash_then_stop(), *(client(n) for n in range(CLIENTS)))
        fired = sum(crashes.values())
        assert fired == CRASHES_TOTAL
        assert max(attempted.values()) < OPERATIONS_PER_CLIENT_MAX, "the clients were busy until the last crash"
        assert retries["account_restarting"] > 0, "some callers must have met a crashed actor and retried"

        # Every restarted actor serves again.
        for account_id in ids:
            await eventually(lambda: engine.deposit(account_id, 1, idempotency_key=f"after-{account_id}"),
                             what=f"{account_id} serving again")
        assert len(acknowledged) + len(refused) == sum(attempted.values())

        # Every acknowledged operation is in the database, once; nothing else is.
        deposits = [r for r in acknowledged if not hasattr(r, "legs")]
        transfers = [r for r in acknowledged if hasattr(r, "legs")]
        for transfer in transfers:
            legs = await engine.store.fetch("SELECT account_id, direction, amount FROM entries "
                                            "WHERE correlation_id = $1", transfer.id)
            assert sorted((r["direction"], r["account_id"], r["amount"]) for r in legs) == [
                ("credit", transfer.to_account, transfer.amount), ("debit", transfer.from_account, transfer.amount)]
        for deposit in deposits:
            rows = await engine.store.fetch("SELECT amount FROM entries WHERE id = $1", deposit.id)
            assert [r["amount"] for r in rows] == [deposit.amount]
        counts = await engine.store.fetch("SELECT kind, count(*) AS n FROM entries GROUP BY kind")
        counts = {r["kind"]: r["n"] for r in counts}
        assert counts["transfer"] == 2 * len(transfers), "no unacknowledged transfer was applied"
        assert counts["deposit"] == len(deposits) + 6 + len(standalone) + len(ids), \
            "no unacknowledged deposit was applied"
        balances = await checked_books(engine)
        assert sum(balances.values()) == initial + sum(d.amount for d in deposits) + len(ids)
        for account_id in ids:
            assert (await engine.get_account(account_id)).balance == balances[account_id]

        # The status shows the restarts, per account, and everything running again.
        async def restarts_counted():
            status = await engine.supervisor_status()
            return status if status["restarts_total"] >= fired else None

        status = await eventually(restarts_counted, what=f"{fired} restarts in the status")
        assert status["quarantined"] == {}
        children = {c["account_id"]: c for node in status["supervisors"] for c in node["accounts"]}
        for account_id, count in crashes.items():
            assert children[account_id]["restarts"] >= count
            assert children[account_id]["state"] in ("running", "passivated")
            assert children[account_id]["last_failure"].startswith(("InjectedFault", "ActorDeadError"))

        # Crash one account more often than the policy allows within the window.
        victim = standalone[0].id
        restarts_so_far = children[victim]["restarts"]
        allowed = settings.supervision.restarts_max - restarts_so_far
        for attempt in range(allowed + 1):
            await engine.inject_fault(victim)
            with pytest.raises(Unavailable) as caught:
                await engine.deposit(victim, 1)
            assert caught.value.code == "account_restarting"
            if attempt < allowed:
                await eventually(lambda: engine.get_account(victim), what="the restarted actor")
        status = await eventually(lambda: _quarantined(engine, victim), what="the account quarantined")
        with pytest.raises(Unavailable) as caught:
            await engine.deposit(victim, 1)
        assert caught.value.code == "account_quarantined"
        with pytest.raises(Unavailable) as caught:
            await engine.transfer(standalone[1].id, victim, 1)
        assert caught.value.code == "account_quarantined"
        node = next(n for n in status["supervisors"] if victim in n["quarantined"])
        assert any(c["account_id"] == victim and c["state"] == "quarantined" for c in node["accounts"])

        engine.release_quarantine(victim)
        before = (await engine.get_account(victim)).balance
        await engine.deposit(victim, 7)
        assert (await engine.get_account(victim)).balance == before + 7
        assert victim not in (await engine.supervisor_status())["quarantined"]
        await checked_books(engine)


async def _quarantined(engine: Engine, account_id: str):
    """The status once both the engine and the account's supervisor list the account (the
    supervisor's snapshot and the engine's list are read at slightly different times)."""
    status = await engine.supervisor_status()
    listed = any(account_id in node["quarantined"] for node in status["supervisors"])
    return status if account_id in status["quarantined"] and listed else None


# -- an operation meeting an account whose actor died after it was leased -------------------------
# `Dispatch.run_steps` leases every account of a multi-account operation first, then hands
# the operation to the first account's actor, which decides every account's part. If one
# of the leased actors fails in between (a crash caused by another message), the healthy
# actor deciding the operation must answer the caller and stay alive. These tests build
# that situation directly.

async def _leased_transfer(engine: Engine, source: str, target: str, amount: int):
    from actors.account import Operation, Reply, Step
    from actors.ids import new_id, next_op_id
    from engine.model import TransferCredit, TransferDebit

    entries = [await engine.registry.acquire(source), await engine.registry.acquire(target)]
    future = asyncio.get_running_loop().create_future()
    operation = Operation(op_id=next_op_id(), reply=Reply(asyncio.get_running_loop(), future), now=engine.clock(),
                          render=lambda decided: decided.transactions, correlation_id=new_id("xfr"), steps=[
                              Step(account_id=source, actor=entries[0].actor, transaction_id=new_id("txn"),
                                   command=TransferDebit(to_account=target, amount=amount)),
                              Step(account_id=target, actor=entries[1].actor, transaction_id=new_id("txn"),
                                   command=TransferCredit(from_account=source, amount=amount))])
    return entries, operation, future


async def _crash(engine: Engine, account_id: str) -> None:
    ref = engine.registry.peek(account_id).ref
    await engine.inject_fault(account_id)
    with pytest.raises(Unavailable):
        await engine.get_account(account_id)
    await eventually(lambda: _async(not ref.is_alive()), what="the actor to stop")


async def _failures(engine: Engine) -> dict[str, str | None]:
    status = await engine.supervisor_status()
    return {c["account_id"]: c["last_failure"] for node in status["supervisors"] for c in node["accounts"]}


async def test_a_transfer_whose_target_actor_died_after_leasing_does_not_fail_the_healthy_source(database_url):
    async with Engine(growth_settings(database_url, fault_injection=True)) as engine:
        source = await engine.create_account(name="s", type="revenue", owner="ann")
        target = await engine.create_account(name="t", type="revenue", owner="ann")
        await engine.deposit(source.id, 100)
        await engine.get_account(target.id)
        entries, operation, future = await _leased_transfer(engine, source.id, target.id, 10)
        try:
            await _crash(engine, target.id)          # the leased target's actor is gone
            assert entries[0].actor.deliver(operation)
            with pytest.raises(Unavailable):
                await asyncio.wait_for(future, timeout=5.0)
        finally:
            for entry in entries:
                engine.registry.release(entry)
        await eventually(lambda: engine.get_account(target.id), what="the target restarted")
        assert (await engine.get_account(source.id)).balance == 100
        failures = await _failures(engine)
        assert failures.get(target.id, "").startswith("InjectedFault")
        assert failures.get(source.id) is None, (
            f"the healthy source actor failed too ({failures.get(source.id)}): a crash of one account "
            "consumes another account's restart budget")


async def test_an_operation_whose_first_actor_died_is_answered_by_the_healthy_one_deciding_it(database_url):
    async with Engine(growth_settings(database_url, fault_injection=True)) as engine:
        source = await engine.create_account(name="s", type="revenue", owner="ann")
        target = await engine.create_account(name="t", type="revenue", owner="ann")
        await engine.deposit(source.id, 100)
        entries, operation, future = await _leased_transfer(engine, source.id, target.id, 10)
        try:
            await _crash(engine, source.id)
            assert entries[1].actor.deliver(operation)   # the target decides it, finding the source dead
            with pytest.raises(Unavailable):
                await asyncio.wait_for(asyncio.shield(future), timeout=2.0)
        except asyncio.TimeoutError:
            pytest.fail("the caller was never answered")
        finally:
            for entry in entries:
                engine.registry.release(entry)
        failures = await _failures(engine)
        assert failures.get(target.id) is None, f"the healthy target actor failed: {failures.get(target.id)}"
        assert (await engine.get_account(target.id)).balance == 0


async def test_a_quarter_of_year_zero_is_a_validation_failure_not_a_crash(engine):
    """Found by fuzzing the OpenAPI description: "0000-Q1" matched the quarter pattern and
    crashed the account actor on `date(0, 1, 1)`."""
    from engine.errors import ValidationFailed

    portfolio = await engine.create_portfolio(name="p", owner="o", initial_capital=1_000_00)
    for quarter in ("0000-Q1", "0999-Q4"):
        with pytest.raises(ValidationFailed):
            await engine.reinvest_portfolio(portfolio.id, quarter)
    status = await engine.supervisor_status()
    assert status["restarts_total"] == 0
