"""The weekly sums the analytics read (`persistence/ledger_weeks.py`): kept in memory per
account and brought up to date with only the entries committed since the last read. They
must always equal the sums of the whole ledger: checked against `engine.analytics.week_totals`
of the account's entries (read straight from PostgreSQL), after every kind of change,
under concurrent reads and writes, from a second store (another engine instance writing),
and with a bound so small that accounts are dropped and read afresh."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import asyncpg

from engine import analytics
from engine.analytics import Entry
from persistence.ledger_weeks import LedgerWeeks
from persistence.store import Store

CAPITAL = 100_000_00


def today():
    return datetime.now(timezone.utc).date()


async def ledger_of(store: Store, account_id: str) -> list[Entry]:
    rows = await store.fetch("SELECT effective_date, kind, direction, amount, balance_after FROM entries "
                             "WHERE account_id = $1 ORDER BY sequence", account_id)
    return [Entry(r["effective_date"], r["kind"], r["direction"], r["amount"], r["balance_after"]) for r in rows]


async def expected_weeks(store: Store, account_ids: list[str]) -> dict[str, list]:
    """The weekly sums from every entry, by the pure function (sorted by week)."""
    return {i: sorted(analytics.week_totals(await ledger_of(store, i)), key=lambda t: t.week_start)
            for i in account_ids}


async def expected_moved(store: Store, account_ids: list[str]) -> tuple[int, int]:
    rows = await store.fetch("SELECT kind, sum(amount)::bigint AS total FROM entries WHERE account_id = ANY($1) "
                             "AND direction = 'debit' AND kind IN ('fork', 'merge') GROUP BY kind", account_ids)
    totals = {r["kind"]: r["total"] for r in rows}
    return totals.get("fork", 0), totals.get("merge", 0)


async def open_portfolio(engine, weeks_back: int = 12):
    opened = today() - timedelta(weeks=weeks_back)
    view = await engine.create_portfolio(name="weeks", owner="ann", initial_capital=CAPITAL, opened_on=opened)
    return view, opened, {a.type: a.id for a in view.accounts}


def changes_of_every_kind(engine, view, opened, ids) -> list:
    """Trades of each kind, flows, a transfer, a fork and the unit's merge, as calls."""
    async def merge_the_unit():
        unit = (await engine.get_portfolio(view.id)).units[0]
        return await engine.merge_portfolio(unit.id)

    # Effective dates never go back before a later entry: dated trades first.
    return [
        lambda: engine.book_trade(ids["revenue"], kind="premium", amount=500_00, effective_date=opened + timedelta(1)),
        lambda: engine.book_trade(ids["revenue"], kind="loss", amount=120_00, effective_date=opened + timedelta(3)),
        lambda: engine.book_trade(ids["revenue"], kind="fee", amount=3_00, effective_date=opened + timedelta(3)),
        lambda: engine.book_trade(ids["generation"], kind="premium", amount=900_00,
                                  effective_date=opened + timedelta(weeks=2, days=4)),
        lambda: engine.deposit(ids["compounding"], 7_000_00),
        lambda: engine.withdraw(ids["revenue"], 250_00),
        lambda: engine.transfer(ids["revenue"], ids["generation"], 1_000_00),
        lambda: engine.fork(ids["generation"], amount=1_000_00),
        merge_the_unit,
    ]


async def test_kept_sums_equal_the_whole_ledgers_sums_after_every_kind_of_change(engine):
    view, opened, ids = await open_portfolio(engine)
    accounts = list(ids.values())
    store = engine.store
    assert await store.analytics_weeks(accounts) == await expected_weeks(store, accounts)

    changes = changes_of_every_kind(engine, view, opened, ids)
    for change in changes:
        await change()
        # A unit forked off has accounts of its own: read them too, cold.
        tree = await store.portfolio_tree(view.id, depth_max=8, nodes_max=100)
        accounts = [i for p in tree for i in p.account_ids]
        assert await store.analytics_weeks(accounts) == await expected_weeks(store, accounts)
        assert await store.growth_moved(accounts) == await expected_moved(store, accounts)
    assert await store.growth_moved(accounts) == (1_000_00, 1_000_00)
    # Nothing was read twice: every account is kept once, with the weeks it has.
    assert len(store.ledger_weeks) == len(accounts)
    assert store.ledger_weeks.weeks_cached == sum(len(w) for w in (await expected_weeks(store, accounts)).values())


async def test_reads_racing_writes_never_count_an_entry_twice(engine):
    _, opened, ids = await open_portfolio(engine, weeks_back=30)
    rev = ids["revenue"]
    store = engine.store

    async def trades():
        for week in range(1, 30):
            day = opened + timedelta(weeks=week)
            await asyncio.gather(*(engine.book_trade(rev, kind="premium", amount=10_00 + n, effective_date=day)
                                   for n in range(8)))

    async def reader(found: list):
        while not writing.done():
            found.append(await store.analytics_weeks([rev]))
            await asyncio.sleep(0)   # a kept account is answered from memory, without a wait

    writing = asyncio.ensure_future(trades())
    seen: list = []
    await asyncio.gather(writing, *(reader(seen) for _ in range(4)))
    balances = {entry.balance_after for entry in await ledger_of(store, rev)}
    assert len(seen) > 10
    for weeks in seen:
        # Each read is the ledger as of one moment: its last balance was a real balance.
        assert weeks[rev][-1].end_balance in balances
    assert await store.analytics_weeks([rev]) == await expected_weeks(store, [rev])


async def test_a_second_store_sees_what_another_instance_commits(engine):
    _, opened, ids = await open_portfolio(engine)
    accounts = list(ids.values())
    other = Store(engine.store.url, pool_size=2)
    await other.open()
    try:
        assert await other.analytics_weeks(accounts) == await expected_weeks(other, accounts)
        await engine.book_trade(ids["compounding"], kind="loss", amount=77_00, effective_date=opened + timedelta(9))
        await engine.deposit(ids["generation"], 1_00)
        assert await other.analytics_weeks(accounts) == await expected_weeks(other, accounts)
    finally:
        await other.close()


async def test_a_tiny_bound_drops_the_least_recently_read_accounts_and_answers_stay_right(engine):
    view, opened, ids = await open_portfolio(engine)
    for week in range(1, 6):
        await engine.book_trade(ids["revenue"], kind="premium", amount=100_00,
                                effective_date=opened + timedelta(weeks=week))
    engine.store.ledger_weeks = LedgerWeeks(weeks_cached_max=3)
    store = engine.store
    for account_id in (ids["revenue"], ids["generation"], ids["compounding"], ids["revenue"]):
        assert await store.analytics_weeks([account_id]) == await expected_weeks(store, [account_id])
        assert store.ledger_weeks.weeks_cached <= 3 or len(store.ledger_weeks) == 1
    # The Rev-Acc alone has more weeks than the bound: it is kept (the last one read is).
    assert len(store.ledger_weeks) == 1
    await engine.book_trade(ids["revenue"], kind="fee", amount=1_00, effective_date=today())
    accounts = list(ids.values())
    assert await store.analytics_weeks(accounts) == await expected_weeks(store, accounts)


async def test_an_account_without_entries_has_no_weeks_and_unknown_ids_are_harmless(engine):
    account = await engine.create_account(name="empty", type="revenue", owner="ann")
    found = await engine.store.analytics_weeks([account.id, "acc_missing", account.id])
    assert found == {account.id: [], "acc_missing": []}
    assert await engine.store.growth_moved([account.id]) == (0, 0)


class CountingPool:
    """A pool that counts the queries it runs, and can hold them until released."""

    def __init__(self, pool, hold: bool = False):
        self.pool, self.queries = pool, 0
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def fetch(self, *args):
        self.queries += 1
        await self.release.wait()
        return await self.pool.fetch(*args)


async def test_reads_of_the_same_accounts_begun_together_share_one_query(engine):
    _, opened, ids = await open_portfolio(engine)
    accounts = list(ids.values())
    await engine.book_trade(ids["revenue"], kind="loss", amount=5_00, effective_date=opened + timedelta(2))
    weeks, counting = LedgerWeeks(), CountingPool(engine.store.pool)
    first, second = await asyncio.gather(weeks.read(counting, accounts), weeks.read(counting, accounts))
    assert counting.queries == 1 and first is second
    # Begun after it: a read of its own (it must see what committed in between).
    await engine.deposit(ids["revenue"], 3_00)
    third = await weeks.read(counting, accounts)
    assert counting.queries == 2
    expected = await expected_weeks(engine.store, accounts)
    assert {i: third[i].totals(i) for i in accounts} == expected


async def test_a_read_whose_shared_query_was_cancelled_reads_on_its_own(engine):
    _, _, ids = await open_portfolio(engine)
    accounts = list(ids.values())
    weeks, held = LedgerWeeks(), CountingPool(engine.store.pool, hold=True)
    leader = asyncio.ensure_future(weeks.read(held, accounts))
    joiner = asyncio.ensure_future(weeks.read(engine.store.pool, accounts))
    while held.queries == 0:
        await asyncio.sleep(0.001)
    leader.cancel()
    found = await asyncio.wait_for(joiner, 10)
    assert leader.cancelled()
    assert {i: found[i].totals(i) for i in accounts} == await expected_weeks(engine.store, accounts)


async def test_a_new_connection_reads_without_a_type_introspection_query(engine):
    """asyncpg introspects parameter types it has no built-in codec for (a bigint[] is
    one) with a query of ~10 ms on every new connection: the read must not need one."""
    _, _, ids = await open_portfolio(engine)

    async def queries_of(work) -> list[str]:
        connection = await asyncpg.connect(engine.store.url)
        try:
            seen: list[str] = []
            connection.add_query_logger(lambda record: seen.append(record.query))
            await work(connection)
            await asyncio.sleep(0.05)  # loggers are called soon after, not during
            return seen
        finally:
            await connection.close()

    # The probe sees an introspection where there is one...
    assert any("typeinfo" in q for q in await queries_of(lambda c: c.fetch("SELECT $1::bigint[]", [1])))
    # ...and the read has none.
    seen = await queries_of(lambda c: LedgerWeeks().read(c, list(ids.values())))
    assert seen and not any("typeinfo" in query for query in seen), seen


def counting_reads(monkeypatch, weeks: LedgerWeeks) -> list:
    """The accounts of every query `weeks` sends (its reads from memory send none)."""
    queried: list = []
    original = weeks._read

    async def counted(pool, account_ids):
        queried.append(list(account_ids))
        return await original(pool, account_ids)

    monkeypatch.setattr(weeks, "_read", counted)
    return queried


async def test_kept_accounts_follow_every_commit_without_a_query(engine, monkeypatch):
    """The writer hands every committed batch to the kept sums (decision 91): after one
    read, an account's sums follow trades, flows, transfers, a fork and a merge with no
    query, and always equal the whole ledger's; a drawdown check reads none either."""
    view, opened, ids = await open_portfolio(engine)
    store = engine.store
    accounts = list(ids.values())
    await store.analytics_weeks(accounts)
    queried = counting_reads(monkeypatch, store.ledger_weeks)
    changes = changes_of_every_kind(engine, view, opened, ids) + [
        lambda: asyncio.gather(*(engine.book_trade(ids["generation"], kind=kind, amount=10_00 + n)
                                 for n, kind in enumerate(["premium", "loss", "fee", "premium"] * 4))),
        lambda: engine.update_account(ids["revenue"], name="renamed"),   # a version with no entry
        lambda: engine.book_trade(ids["revenue"], kind="premium", amount=1_00),
    ]
    for change in changes:
        await change()
        assert await store.analytics_weeks(accounts) == await expected_weeks(store, accounts)
        assert await store.growth_moved(accounts) == await expected_moved(store, accounts)
    await engine.risk.check_many(accounts)
    assert queried == []


class HeldAfterQuery:
    """A pool whose query runs at once (its snapshot is taken) but whose answer is held
    until released."""

    def __init__(self, pool):
        self.pool, self.ran, self.release = pool, asyncio.Event(), asyncio.Event()

    async def fetch(self, *args):
        rows = await self.pool.fetch(*args)
        self.ran.set()
        await self.release.wait()
        return rows


async def read_around(weeks: LedgerWeeks, pool, account_ids: list, meanwhile) -> dict:
    """A read of `account_ids` whose query runs (takes its snapshot) before
    `await meanwhile()`, and whose answer arrives after it."""
    held = HeldAfterQuery(pool)
    reading = asyncio.ensure_future(weeks.read(held, account_ids))
    await held.ran.wait()
    await meanwhile()
    held.release.set()
    return await reading


async def test_a_commit_while_the_first_read_is_in_flight_is_not_missed(engine, monkeypatch):
    """The first read of an account takes its snapshot, a trade commits, then the read's
    answer arrives: the trade is not in it, and the batch could not be folded in (the
    account was not kept yet). The account is kept but not current: the next read
    queries, and finds the trade."""
    _, _, ids = await open_portfolio(engine)
    rev = ids["revenue"]
    store = engine.store
    await read_around(store.ledger_weeks, store.pool, [rev],
                      lambda: engine.book_trade(rev, kind="premium", amount=42_00))
    queried = counting_reads(monkeypatch, store.ledger_weeks)
    assert await store.analytics_weeks([rev]) == await expected_weeks(store, [rev])
    assert queried == [[rev]]
    # From there on it is current: the next trade needs no query.
    await engine.book_trade(rev, kind="loss", amount=2_00)
    assert await store.analytics_weeks([rev]) == await expected_weeks(store, [rev])
    assert queried == [[rev]]


async def test_a_batch_of_unknown_outcome_and_a_new_connection_make_the_sums_read_again(engine, monkeypatch):
    """A batch that failed with its outcome unknown may have committed: its accounts are
    forgotten. A new writer connection (another engine may have written meanwhile)
    forgets every account."""
    _, _, ids = await open_portfolio(engine)
    accounts = list(ids.values())
    store, writer = engine.store, engine.writer
    await store.analytics_weeks(accounts)
    assert len(store.ledger_weeks) == len(accounts) and store.ledger_weeks.fed
    from persistence.writer import WriteOp
    writer._fail([WriteOp(op_id=0, accounts=(ids["revenue"],), done=lambda result, error: None)],
                 RuntimeError("outcome unknown"), poison=True)
    assert len(store.ledger_weeks) == len(accounts) - 1
    writer.poisoned.discard(ids["revenue"])
    writer._drop_connection()
    assert len(store.ledger_weeks) == 0 and not store.ledger_weeks.fed
    await engine.deposit(ids["generation"], 5_00)   # reconnects
    assert store.ledger_weeks.fed
    queried = counting_reads(monkeypatch, store.ledger_weeks)
    assert await store.analytics_weeks(accounts) == await expected_weeks(store, accounts)
    assert queried == [accounts]


# -- found by a reviewer of decision 91: each failed before its fix ----------------------
async def keep_not_current(engine, rev):
    """`rev` kept, but not current: a trade commits while its first read is in flight."""
    store = engine.store
    await read_around(store.ledger_weeks, store.pool, [rev], lambda: engine.book_trade(rev, kind="loss", amount=10_00))
    kept = store.ledger_weeks._accounts[rev]
    assert kept.sequence >= 0 and not kept.current


async def read_while_a_failure_forgets_it(engine, rev):
    """A read of `rev` (from its kept version) whose query has run when an operation on
    `rev` fails (its accounts forgotten), answered after."""
    store, writer = engine.store, engine.writer
    from persistence.writer import WriteOp

    async def fail():
        writer._fail([WriteOp(op_id=0, accounts=(rev,), done=lambda result, error: None)],
                     RuntimeError("rejected"), poison=True)
        writer.poisoned.discard(rev)

    return (await read_around(store.ledger_weeks, store.pool, [rev], fail))[rev]


async def test_a_read_whose_account_is_forgotten_meanwhile_reads_it_whole_again(engine, monkeypatch):
    """Its query asked only for the entries after the kept version: answering those as the
    whole ledger gave a partial one (with a loss after the kept version, a negative
    balance and an AssertionError out of the drawdown check)."""
    monkeypatch.setattr(engine.risk, "after_trade", lambda *args: None)   # no check meddling
    _, opened, ids = await open_portfolio(engine)
    rev = ids["revenue"]
    await engine.book_trade(rev, kind="premium", amount=500_00, effective_date=opened + timedelta(1))
    await keep_not_current(engine, rev)
    found = await read_while_a_failure_forgets_it(engine, rev)
    assert found.totals(rev) == (await expected_weeks(engine.store, [rev]))[rev]


async def test_a_read_in_flight_across_a_writer_reconnection_reads_it_whole_again(engine):
    """The writer's connection drops (reads go on from SQL, keeping accounts, while
    nothing is fed); its reconnection forgets everything while a read from a kept
    version is in flight: that read must not answer its rows as the whole ledger."""
    _, opened, ids = await open_portfolio(engine)
    rev = ids["revenue"]
    store, writer = engine.store, engine.writer
    await engine.book_trade(rev, kind="premium", amount=500_00, effective_date=opened + timedelta(1))
    writer._drop_connection()
    await store.analytics_weeks([rev])
    assert rev in store.ledger_weeks._accounts and not store.ledger_weeks.fed
    expected = (await expected_weeks(store, [rev]))[rev]
    found = await read_around(store.ledger_weeks, store.pool, [rev], writer.ensure_connection)
    assert store.ledger_weeks.fed
    assert found[rev].totals(rev) == expected


async def test_a_commit_folded_into_sums_the_bound_then_drops_is_not_lost(engine):
    """Two first reads R1 and R2 of an account; R2 keeps it; a trade commits and is folded
    into R2's sums; the bound drops them; R1, whose snapshot is older than the trade,
    keeps its sums: they must not count as current."""
    _, opened, ids = await open_portfolio(engine)
    rev, gen = ids["revenue"], ids["generation"]
    store = engine.store
    weeks = store.ledger_weeks
    weeks.clear(fed=True)
    weeks.weeks_cached_max = 1

    async def second_read_a_trade_and_the_bound():
        await weeks.read(store.pool, [rev])
        await engine.book_trade(rev, kind="premium", amount=42_00)
        await weeks.read(store.pool, [gen])
        assert rev not in weeks._accounts

    await read_around(weeks, store.pool, [rev], second_read_a_trade_and_the_bound)
    assert await store.analytics_weeks([rev]) == await expected_weeks(store, [rev])


async def test_a_failure_keeping_the_sums_fails_no_write_and_they_are_read_from_the_database(engine, monkeypatch):
    """A bug in the hand-over must not fail operations that committed: the writer logs
    it and stops answering from memory."""
    _, _, ids = await open_portfolio(engine)
    rev = ids["revenue"]
    store = engine.store
    await store.analytics_weeks([rev])

    def broken(*args):
        raise RuntimeError("a bug in the hand-over")

    monkeypatch.setattr(store.ledger_weeks, "committed", broken)
    await engine.deposit(rev, 7_00)
    assert not store.ledger_weeks.fed and len(store.ledger_weeks) == 0
    assert await store.analytics_weeks([rev]) == await expected_weeks(store, [rev])
