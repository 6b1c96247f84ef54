"""Integration: the real account actors, the real writer and a real PostgreSQL database
(one per test), driven through the embedding API (`Engine`, `BlockingEngine`)."""
from __future__ import annotations

import asyncio
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta

import asyncpg
import pytest

from actors.api import BlockingEngine, Engine
from actors.settings import load_settings
from engine.errors import IdempotencyKeyReused, NotFound, Refused, Unavailable, ValidationFailed
from engine.model import Account, Transaction, Transfer
from engine.requests import DepositRequest, TradeRequest, TransferRequest, WithdrawalRequest
from tests.conftest import eventually



def engine_settings(database_url: str, **engine_overrides):
    overrides = {"database": {"url": database_url}}
    if engine_overrides:
        overrides["engine"] = engine_overrides
    return load_settings({}, overrides)


# -- helpers ---------------------------------------------------------------------------------


async def checked_books(fetch, account_ids) -> dict[str, int]:
    """Reads the accounts and their entries from the database and checks, per account,
    that the balance is the sum of its entries and that each entry's balance_after is the
    running sum in sequence order. Returns the committed balance of each account."""
    ids = list(account_ids)
    rows = await fetch("SELECT id, balance FROM accounts WHERE id = ANY($1::text[])", ids)
    balances = {row["id"]: row["balance"] for row in rows}
    assert set(balances) == set(ids)
    entries = await fetch(
        "SELECT account_id, sequence, direction, amount, balance_after FROM entries "
        "WHERE account_id = ANY($1::text[]) ORDER BY account_id, sequence", ids)
    running: dict[str, int] = dict.fromkeys(ids, 0)
    for entry in entries:
        delta = entry["amount"] if entry["direction"] == "credit" else -entry["amount"]
        running[entry["account_id"]] += delta
        assert entry["balance_after"] == running[entry["account_id"]], dict(entry)
        assert entry["balance_after"] >= 0
    for account_id in ids:
        assert balances[account_id] == running[account_id], account_id
    return balances


async def entry_count(engine: Engine, account_id: str) -> int:
    rows = await engine.store.fetch("SELECT count(*) AS n FROM entries WHERE account_id = $1", account_id)
    return rows[0]["n"]


async def snapshot(engine: Engine, account_id: str):
    """What the engine says and what the database holds about one account."""
    account = await engine.get_account(account_id)
    row = (await engine.store.fetch("SELECT balance, version, status FROM accounts WHERE id = $1", account_id))[0]
    return (account.balance, account.version, account.status), tuple(row), await entry_count(engine, account_id)


async def funded(engine: Engine, amount: int, *, type: str = "revenue", owner: str = "ann", name: str = "acc"):
    account = await engine.create_account(name=name, type=type, owner=owner)
    if amount:
        await engine.deposit(account.id, amount)
    return account


# -- (a), (b) concurrency --------------------------------------------------------------------

async def test_thirty_two_clients_transferring_among_twenty_accounts_conserve_the_total(engine):
    accounts = [await engine.create_account(name=f"a{i}", type="revenue", owner="ann") for i in range(20)]
    await asyncio.gather(*(engine.deposit(account.id, 100_000) for account in accounts))
    ids = [account.id for account in accounts]

    async def client(seed: int) -> list[Transfer]:
        rng = random.Random(seed)
        done = []
        for _ in range(25):
            source, target = rng.sample(ids, 2)
            try:
                done.append(await engine.transfer(source, target, rng.randint(1, 60_000)))
            except Refused as refusal:
                assert refusal.code == "insufficient_funds"
        return done

    results = await asyncio.gather(*(client(seed) for seed in range(32)))
    transfers = [transfer for done in results for transfer in done]
    assert transfers, "no transfer went through"

    in_memory = {account_id: (await engine.get_account(account_id)).balance for account_id in ids}
    assert sum(in_memory.values()) == 20 * 100_000
    committed = await checked_books(engine.store.fetch, ids)
    assert committed == in_memory

    # Each acknowledged transfer is exactly two legs in the database, and nothing else moved.
    legs = await engine.store.fetch(
        "SELECT correlation_id, account_id, direction, amount FROM entries WHERE kind = 'transfer'")
    assert len(legs) == 2 * len(transfers)
    by_transfer: dict[str, list] = {}
    for leg in legs:
        by_transfer.setdefault(leg["correlation_id"], []).append(leg)
    for transfer in transfers:
        pair = sorted(by_transfer[transfer.id], key=lambda leg: leg["direction"])
        assert [(leg["direction"], leg["account_id"], leg["amount"]) for leg in pair] == [
            ("credit", transfer.to_account, transfer.amount), ("debit", transfer.from_account, transfer.amount)]
        for leg in transfer.legs:
            assert await engine.get_transaction(leg.id) == leg


async def test_thirty_two_clients_depositing_one_cent_fifty_times_end_exactly_right(engine):
    account = await engine.create_account(name="jar", type="generation", owner="ann")

    async def client() -> list[Transaction]:
        return [await engine.deposit(account.id, 1) for _ in range(50)]

    receipts = [t for done in await asyncio.gather(*(client() for _ in range(32))) for t in done]
    assert (await engine.get_account(account.id)).balance == 32 * 50
    assert sorted(t.balance_after for t in receipts) == list(range(1, 32 * 50 + 1))
    assert (await checked_books(engine.store.fetch, [account.id]))[account.id] == 32 * 50
    assert await entry_count(engine, account.id) == 32 * 50


# -- (c) idempotency ---------------------------------------------------------------------------

async def test_the_same_key_and_request_returns_the_original_transaction_without_applying_it_again(engine):
    account = await funded(engine, 0)
    first = await engine.deposit(account.id, 2_500, memo="payday", idempotency_key="dep-1")
    again = await engine.deposit(account.id, 2_500, memo="payday", idempotency_key="dep-1")
    assert again == first
    assert (await engine.get_account(account.id)).balance == 2_500
    assert await entry_count(engine, account.id) == 1


async def test_the_same_key_with_a_different_request_is_refused_as_reused(engine):
    account = await funded(engine, 0)
    other = await funded(engine, 0)
    await engine.deposit(account.id, 2_500, idempotency_key="dep-1")
    with pytest.raises(IdempotencyKeyReused) as caught:
        await engine.deposit(account.id, 2_501, idempotency_key="dep-1")
    assert caught.value.code == "idempotency_key_reused"
    with pytest.raises(IdempotencyKeyReused):
        await engine.deposit(other.id, 2_500, idempotency_key="dep-1")
    with pytest.raises(IdempotencyKeyReused):
        await engine.withdraw(account.id, 2_500, idempotency_key="dep-1")
    assert (await engine.get_account(account.id)).balance == 2_500
    assert (await engine.get_account(other.id)).balance == 0


async def test_idempotent_transfers_and_account_creation_are_applied_once(engine):
    source = await funded(engine, 10_000)
    target = await funded(engine, 0)
    first = await engine.transfer(source.id, target.id, 4_000, idempotency_key="xfr-1")
    assert await engine.transfer(source.id, target.id, 4_000, idempotency_key="xfr-1") == first
    assert [leg.balance_after for leg in first.legs] == [6_000, 4_000]
    assert (await engine.get_account(source.id)).balance == 6_000
    assert (await engine.get_account(target.id)).balance == 4_000

    created = await engine.create_account(name="once", type="revenue", owner="bob", idempotency_key="acc-1")
    assert await engine.create_account(name="once", type="revenue", owner="bob", idempotency_key="acc-1") == created
    assert len((await engine.list_accounts(owner="bob")).items) == 1


async def test_a_retry_after_a_restart_returns_the_original_result(engine, database_url):
    account = await funded(engine, 0)
    target = await funded(engine, 0)
    deposit = await engine.deposit(account.id, 7_000, idempotency_key="dep-restart")
    transfer = await engine.transfer(account.id, target.id, 1_000, idempotency_key="xfr-restart")
    await engine.stop()

    restarted = Engine(engine_settings(database_url))
    await restarted.start()
    try:
        assert await restarted.deposit(account.id, 7_000, idempotency_key="dep-restart") == deposit
        assert await restarted.transfer(account.id, target.id, 1_000, idempotency_key="xfr-restart") == transfer
        with pytest.raises(IdempotencyKeyReused):
            await restarted.deposit(account.id, 7_001, idempotency_key="dep-restart")
        assert (await restarted.get_account(account.id)).balance == 6_000
        assert (await restarted.get_account(target.id)).balance == 1_000
        assert await checked_books(restarted.store.fetch, [account.id, target.id]) == {
            account.id: 6_000, target.id: 1_000}
    finally:
        await restarted.stop()


async def test_concurrent_duplicates_with_one_key_apply_once(engine):
    account = await funded(engine, 0)
    results = await asyncio.gather(*(engine.deposit(account.id, 300, idempotency_key="dup") for _ in range(16)))
    assert all(result == results[0] for result in results)
    assert (await engine.get_account(account.id)).balance == 300
    assert await entry_count(engine, account.id) == 1


async def test_a_different_request_racing_an_in_flight_key_is_refused_as_reused(engine):
    account = await funded(engine, 0)
    outcomes = await asyncio.gather(engine.deposit(account.id, 300, idempotency_key="race"),
                                    engine.deposit(account.id, 301, idempotency_key="race"),
                                    return_exceptions=True)
    assert isinstance(outcomes[0], Transaction)
    assert isinstance(outcomes[1], IdempotencyKeyReused)
    assert (await engine.get_account(account.id)).balance == 300


# -- (d) refusals change nothing ----------------------------------------------------------------

async def refused_without_change(engine: Engine, account_ids, operation, code: str) -> None:
    before = [await snapshot(engine, account_id) for account_id in account_ids]
    with pytest.raises(Refused) as caught:
        await operation
    assert caught.value.code == code
    assert [await snapshot(engine, account_id) for account_id in account_ids] == before


async def test_a_withdrawal_or_transfer_beyond_the_balance_is_refused_and_changes_nothing(engine):
    account = await funded(engine, 1_000)
    other = await funded(engine, 0)
    await refused_without_change(engine, [account.id], engine.withdraw(account.id, 1_001), "insufficient_funds")
    await refused_without_change(engine, [account.id, other.id], engine.transfer(account.id, other.id, 1_001),
                                 "insufficient_funds")
    await refused_without_change(engine, [account.id],
                                 engine.book_trade(account.id, kind="loss", amount=1_001), "insufficient_funds")
    assert (await engine.withdraw(account.id, 1_000)).balance_after == 0


async def test_closing_a_non_empty_account_is_refused_and_changes_nothing(engine):
    account = await funded(engine, 1)
    await refused_without_change(engine, [account.id], engine.close_account(account.id), "account_not_empty")
    await engine.withdraw(account.id, 1)
    closed = await engine.close_account(account.id)
    assert closed.status == "closed"
    await refused_without_change(engine, [account.id], engine.deposit(account.id, 5), "account_not_active")
    await refused_without_change(engine, [account.id], engine.update_account(account.id, status="active"),
                                 "account_not_active")


async def test_withdrawing_from_a_compounding_account_is_refused_and_changes_nothing(engine):
    compounding = await funded(engine, 5_000, type="compounding")
    other = await funded(engine, 0)
    await refused_without_change(engine, [compounding.id], engine.withdraw(compounding.id, 1),
                                 "withdrawal_not_allowed")
    await refused_without_change(engine, [compounding.id, other.id], engine.transfer(compounding.id, other.id, 1),
                                 "withdrawal_not_allowed")
    # Money may still flow in.
    await engine.deposit(other.id, 90)
    assert [leg.balance_after for leg in (await engine.transfer(other.id, compounding.id, 90)).legs] == [0, 5_090]
    assert (await engine.book_trade(compounding.id, kind="premium", amount=10)).balance_after == 5_100


async def test_depositing_to_a_frozen_account_is_refused_and_changes_nothing(engine):
    frozen = await funded(engine, 500)
    source = await funded(engine, 800)
    assert (await engine.update_account(frozen.id, status="frozen")).status == "frozen"
    await refused_without_change(engine, [frozen.id], engine.deposit(frozen.id, 10), "account_not_active")
    await refused_without_change(engine, [frozen.id], engine.withdraw(frozen.id, 10), "account_not_active")
    # A transfer into it is refused by the target after the source has decided its debit:
    # the source must give the debit back.
    await refused_without_change(engine, [source.id, frozen.id], engine.transfer(source.id, frozen.id, 300),
                                 "account_not_active")
    assert (await engine.withdraw(source.id, 800)).balance_after == 0
    thawed = await engine.update_account(frozen.id, status="active")
    assert (thawed.status, thawed.balance) == ("active", 500)
    assert (await engine.deposit(frozen.id, 10)).balance_after == 510


async def test_bad_amounts_are_validation_failures_and_unknown_ids_are_not_found(engine):
    account = await funded(engine, 100)
    for amount in (0, -1, 1.5, "10", True, 10**15 + 1, None):
        with pytest.raises(ValidationFailed):
            await engine.deposit(account.id, amount)
    with pytest.raises(ValidationFailed):
        await engine.transfer(account.id, account.id, 1)
    with pytest.raises(ValidationFailed):
        await engine.deposit(account.id, 1, memo="x" * 501)
    with pytest.raises(ValidationFailed):
        await engine.create_account(name="x", type="checking", owner="ann")
    with pytest.raises(ValidationFailed):
        await engine.book_trade(account.id, kind="dividend", amount=1)
    with pytest.raises(NotFound):
        await engine.get_account("acc_missing")
    with pytest.raises(NotFound):
        await engine.deposit("acc_missing", 1)
    with pytest.raises(NotFound):
        await engine.transfer(account.id, "acc_missing", 1)
    with pytest.raises(NotFound):
        await engine.get_transaction("txn_missing")
    assert (await engine.deposit(account.id, 10**15)).balance_after == 10**15 + 100
    assert (await snapshot(engine, account.id))[2] == 2


async def test_a_trade_can_be_booked_for_an_earlier_week_but_not_the_future(engine):
    opened = date.today() - timedelta(days=30)
    account = await engine.create_account(name="gen", type="generation", owner="ann", opened_on=opened)
    trade = await engine.book_trade(account.id, kind="premium", amount=900, effective_date=opened + timedelta(days=7))
    assert trade.effective_date == opened + timedelta(days=7)
    with pytest.raises(Refused) as caught:
        await engine.book_trade(account.id, kind="premium", amount=1, effective_date=opened)
    assert caught.value.code == "validation_failed"
    with pytest.raises(Refused):
        await engine.book_trade(account.id, kind="premium", amount=1, effective_date=date.today() + timedelta(days=2))
    assert (await snapshot(engine, account.id))[0][0] == 900


@pytest.mark.parametrize("status_change", ["close", "freeze"])
async def test_a_status_change_decided_after_a_transfer_out_never_overtakes_it(engine, status_change):
    """The source's actor decides the transfer's debit first and the status change second
    (on the tentative balance the debit leaves), so both are valid in that order. The
    transfer's write is submitted by the target's actor; when the target is busy, the
    status change must still not reach the database first."""
    source = await funded(engine, 100, name="source")
    target = await funded(engine, 0, name="target")
    await engine.get_account(target.id)
    # A queue of reads in the target's mailbox delays its half of the transfer.
    reads = [asyncio.ensure_future(engine.get_account(target.id)) for _ in range(3000)]
    transfer = asyncio.ensure_future(engine.transfer(source.id, target.id, 100))
    if status_change == "close":
        change = asyncio.ensure_future(engine.close_account(source.id))
    else:
        change = asyncio.ensure_future(engine.update_account(source.id, status="frozen"))
    outcomes = await asyncio.gather(transfer, change, return_exceptions=True)
    await asyncio.gather(*reads)

    assert isinstance(outcomes[0], Transfer), f"the transfer failed: {outcomes[0]!r}"
    assert isinstance(outcomes[1], Account), f"the {status_change} failed: {outcomes[1]!r}"
    assert outcomes[1].status == ("closed" if status_change == "close" else "frozen")
    assert await checked_books(engine.store.fetch, [source.id, target.id]) == {source.id: 0, target.id: 100}


# -- (e) pagination --------------------------------------------------------------------------

async def test_list_accounts_pages_through_every_match_once_in_id_order(engine):
    mine = [await engine.create_account(name=f"p{i}", type="revenue" if i % 2 else "generation", owner="pager")
            for i in range(7)]
    for i in range(3):
        await engine.create_account(name=f"o{i}", type="revenue", owner="other")
    seen, cursor, pages = [], None, 0
    while True:
        page = await engine.list_accounts(owner="pager", limit=3, cursor=cursor)
        pages += 1
        assert len(page.items) <= 3
        seen.extend(account.id for account in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3
    assert seen == sorted(account.id for account in mine)
    revenue = await engine.list_accounts(owner="pager", type="revenue", limit=500)
    assert {a.id for a in revenue.items} == {a.id for a in mine if a.type == "revenue"}
    assert revenue.next_cursor is None
    exact = await engine.list_accounts(owner="other", limit=3)
    assert (len(exact.items), exact.next_cursor) == (3, None)
    for bad in (0, 501, True):
        with pytest.raises(ValidationFailed):
            await engine.list_accounts(limit=bad)


async def test_list_transactions_pages_newest_first_with_balance_after(engine):
    account = await funded(engine, 0)
    for amount in (1, 2, 3):
        await engine.deposit(account.id, amount)
    # A status change bumps the version without an entry: sequences then have gaps.
    await engine.update_account(account.id, status="frozen")
    await engine.update_account(account.id, status="active")
    for amount in (4, 5, 6, 7):
        await engine.deposit(account.id, amount)

    pages, cursor = [], None
    while True:
        page = await engine.list_transactions(account.id, limit=3, cursor=cursor)
        pages.append(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [[t.amount for t in items] for items in pages] == [[7, 6, 5], [4, 3, 2], [1]]
    assert [t.balance_after for items in pages for t in items] == [28, 21, 15, 10, 6, 3, 1]
    sequences = [t.sequence for items in pages for t in items]
    assert sequences == sorted(sequences, reverse=True)

    exact = await engine.list_transactions(account.id, limit=7)
    assert (len(exact.items), exact.next_cursor) == (7, None)
    with pytest.raises(NotFound):
        await engine.list_transactions("acc_missing")
    with pytest.raises(ValidationFailed):
        await engine.list_transactions(account.id, cursor="abc")
    one = exact.items[0]
    assert await engine.get_transaction(one.id) == one


# -- (f) a failed batch --------------------------------------------------------------------

async def wait_until_writer_waits_on_a_lock(engine: Engine, writer_pid: int) -> None:
    async def waiting():
        rows = await engine.store.fetch(
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'", writer_pid)
        return bool(rows)

    await eventually(waiting, what="the writer to block on the row lock")


async def test_a_failed_batch_acknowledges_nothing_and_leaves_memory_equal_to_the_database(engine, database_url):
    account = await funded(engine, 1_000_000, name="victim")
    other = await funded(engine, 1_000_000, name="other")
    ids = [account.id, other.id]
    writer_pid = engine.writer.connection.get_server_pid()

    # Hold the victim's row lock from outside so the writer's next batch blocks inside its
    # transaction, then kill the writer's backend: that batch fails mid-transaction.
    blocker = await asyncpg.connect(database_url)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account.id)
        doomed = [asyncio.ensure_future(engine.deposit(account.id, 100 + i, memo=f"doomed-{i}")) for i in range(5)]
        doomed.append(asyncio.ensure_future(engine.transfer(other.id, account.id, 777, memo="doomed-transfer")))
        await wait_until_writer_waits_on_a_lock(engine, writer_pid)
        # More operations arrive while the batch is stuck; they queue behind it.
        queued = [asyncio.ensure_future(engine.deposit(account.id, 1_000 + i, memo=f"queued-{i}")) for i in range(5)]
        queued.append(asyncio.ensure_future(engine.withdraw(other.id, 5, memo="queued-other")))
        await engine.store.fetch("SELECT pg_terminate_backend($1)", writer_pid)
        outcomes = await asyncio.gather(*doomed, *queued, return_exceptions=True)
    finally:
        await blocking.rollback()
        await blocker.close()

    for outcome in outcomes[:len(doomed)]:
        assert isinstance(outcome, Unavailable), outcome
    for outcome in outcomes:
        assert isinstance(outcome, (Transaction, Transfer, Unavailable)), outcome

    # The engine recovers by itself: writes on both accounts succeed again.
    await eventually(lambda: engine.deposit(account.id, 1, memo="after"), what="a deposit to succeed again")
    await eventually(lambda: engine.deposit(other.id, 1, memo="after"), what="a deposit to succeed again")

    acknowledged = [o for o in outcomes if not isinstance(o, BaseException)]
    acknowledged_ids = {leg.id for o in acknowledged for leg in (o.legs if isinstance(o, Transfer) else [o])}
    committed = await checked_books(engine.store.fetch, ids)
    entries = await engine.store.fetch("SELECT id, memo FROM entries WHERE account_id = ANY($1::text[])", ids)
    assert acknowledged_ids <= {e["id"] for e in entries}
    assert not [e for e in entries if (e["memo"] or "").startswith("doomed")]
    for account_id in ids:
        state = await engine.get_account(account_id)
        assert state.balance == committed[account_id]
        row = (await engine.store.fetch("SELECT version FROM accounts WHERE id = $1", account_id))[0]
        assert state.version == row["version"]
    total = 2_000_000 + 2 + sum(o.amount for o in acknowledged if isinstance(o, Transaction) and o.kind == "deposit") \
        - sum(o.amount for o in acknowledged if isinstance(o, Transaction) and o.kind == "withdrawal")
    assert sum(committed.values()) == total
    assert engine.status()["poisoned_accounts"] == []


async def test_while_the_database_is_down_writes_fail_reads_work_and_the_engine_recovers(
        engine, database_url, postgres_admin_url):
    account = await funded(engine, 50_000, name="steady")
    other = await funded(engine, 0, name="other")
    await engine.get_account(other.id)  # resident from here on
    database = database_url.split("?")[0].rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await take_the_database_down(admin, database)

        attempts = await asyncio.gather(*(engine.deposit(account.id, 10) for _ in range(5)),
                                        engine.transfer(account.id, other.id, 10), return_exceptions=True)
        assert all(isinstance(outcome, Unavailable) for outcome in attempts), attempts
        # Resident accounts still answer reads from their committed state.
        assert (await engine.get_account(account.id)).balance == 50_000
        assert (await engine.get_account(other.id)).balance == 0
        assert not await engine.check_ready()
    finally:
        await bring_the_database_back(admin, database)
        await admin.close()

    receipt = await eventually(lambda: engine.deposit(account.id, 10), what="the engine to accept writes again")
    assert receipt.balance_after == 50_010
    await eventually(engine.check_ready, what="readiness")
    transfer = await eventually(lambda: engine.transfer(account.id, other.id, 10), what="a transfer to succeed")
    assert [leg.balance_after for leg in transfer.legs] == [50_000, 10]
    committed = await checked_books(engine.store.fetch, [account.id, other.id])
    assert committed == {account.id: 50_000, other.id: 10}
    assert (await engine.get_account(account.id)).balance == 50_000
    assert (await engine.get_account(other.id)).balance == 10


async def take_the_database_down(admin, database: str) -> None:
    await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database)


async def bring_the_database_back(admin, database: str) -> None:
    await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


async def test_accounts_whose_writes_failed_reload_by_themselves_once_the_database_returns(
        engine, database_url, postgres_admin_url):
    """SPEC section 5: the engine recovers by itself when the database returns. A client
    whose first write after the outage meets a healthy database should not get a 503."""
    account = await funded(engine, 1_000, name="stale")
    database = database_url.split("?")[0].rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await take_the_database_down(admin, database)
        with pytest.raises(Unavailable):
            await engine.deposit(account.id, 1)
    finally:
        await bring_the_database_back(admin, database)
        await admin.close()

    await eventually(engine.check_ready, what="readiness")

    async def writer_healthy():
        return engine.writer.healthy

    await eventually(writer_healthy, what="the writer to reconnect")
    await eventually(lambda: _no_poisoned_accounts(engine), timeout_s=5.0,
                     what="the failed account to reload without a client request")
    assert (await engine.deposit(account.id, 1)).balance_after == 1_001


async def _no_poisoned_accounts(engine: Engine) -> bool:
    return not engine.status()["poisoned_accounts"]


# -- (g) BlockingEngine ------------------------------------------------------------------------

async def test_the_blocking_engine_serves_plain_threaded_code(database_url):
    def threaded_program():
        with BlockingEngine(engine_settings(database_url)) as blocking:
            account = blocking.create_account(name="threads", type="revenue", owner="ann")
            with ThreadPoolExecutor(max_workers=8) as pool:
                receipts = list(pool.map(lambda _: blocking.deposit(account.id, 25), range(80)))
            assert sorted(r.balance_after for r in receipts) == [25 * n for n in range(1, 81)]
            with pytest.raises(Refused):
                blocking.withdraw(account.id, 10**6)
            page = blocking.list_transactions(account.id, limit=5)
            status = blocking.status()
            return blocking.get_account(account.id), page, status

    account, page, status = await asyncio.to_thread(threaded_program)
    assert account.balance == 2_000
    assert [t.balance_after for t in page.items] == [2_000, 1_975, 1_950, 1_925, 1_900]
    assert status["ready"] is True

    # What the blocking engine acknowledged is in the database.
    connection = await asyncpg.connect(database_url)
    try:
        assert await checked_books(connection.fetch, [account.id]) == {account.id: 2_000}
    finally:
        await connection.close()


# -- the books survive a restart ----------------------------------------------------------

async def test_a_restarted_engine_loads_the_committed_state(engine, database_url):
    account = await funded(engine, 12_345)
    await engine.book_trade(account.id, kind="fee", amount=45)
    before = await engine.get_account(account.id)
    await engine.stop()
    restarted = Engine(engine_settings(database_url))
    await restarted.start()
    try:
        after = await restarted.get_account(account.id)
        assert after == before
        assert Counter(t.kind for t in (await restarted.list_transactions(account.id)).items) == Counter(
            {"deposit": 1, "fee": 1})
    finally:
        await restarted.stop()


# -- activation and passivation ------------------------------------------------------------

async def test_an_idle_account_is_passivated_and_comes_back_from_the_database_unchanged(database_url):
    engine = Engine(engine_settings(database_url, passivate_idle_s=0.05))
    await engine.start()
    try:
        account = await funded(engine, 4_200)
        other = await funded(engine, 0)
        await engine.transfer(account.id, other.id, 200)
        before = await engine.get_account(account.id)

        async def passivated():
            return engine.registry.peek(account.id) is None and engine.registry.peek(other.id) is None

        await eventually(passivated, what="the idle accounts to be passivated")
        assert await engine.get_account(account.id) == before
        assert (await engine.withdraw(account.id, 4_000)).balance_after == 0
        assert (await engine.get_account(other.id)).balance == 200
        assert await checked_books(engine.store.fetch, [account.id, other.id]) == {account.id: 0, other.id: 200}
    finally:
        await engine.stop()


async def test_activating_an_account_while_every_resident_actor_is_busy_does_not_break_the_caller(database_url):
    """With the resident cap reached and every resident account busy (an operation in
    flight), activating one more account may exceed the cap for a while or refuse with a
    503, but must not fail with an internal error."""
    engine = Engine(engine_settings(database_url, resident_accounts_max=16))
    await engine.start()
    blocker = await asyncpg.connect(database_url)
    try:
        busy = [await engine.create_account(name=f"busy{i}", type="revenue", owner="ann") for i in range(16)]
        late = await engine.create_account(name="late", type="revenue", owner="ann")
        for account in busy:
            await engine.get_account(account.id)  # resident
        writer_pid = engine.writer.connection.get_server_pid()
        locking = blocker.transaction()
        await locking.start()
        await blocker.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", busy[0].id)
        # Every busy account gets an operation that stays in flight behind the blocked writer.
        in_flight = [asyncio.ensure_future(engine.deposit(account.id, 1)) for account in busy]
        await wait_until_writer_waits_on_a_lock(engine, writer_pid)
        try:
            outcome = await engine.get_account(late.id)
        except Unavailable as error:
            outcome = error
        except Exception as error:  # noqa: BLE001 - the bug this test is about
            outcome = error
        await locking.rollback()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        assert all(isinstance(r, (Transaction, Unavailable)) for r in results), results
        assert isinstance(outcome, (Account, Unavailable)), f"activation failed with {outcome!r}"
    finally:
        await blocker.close()
        await engine.stop()


async def test_an_operation_stuck_behind_a_blocked_writer_times_out_and_the_engine_goes_on(database_url):
    """`operation_timeout_s` bounds every wait: operations behind a commit that cannot
    finish fail with 503 operation_timeout (keyed or not); an outside cancellation is
    still a cancellation; once the writer is free, operations succeed again."""
    from tests.conftest import engine_settings

    engine = Engine(engine_settings(database_url, operation_timeout_s=0.5))
    await engine.start()
    blocker = await asyncpg.connect(database_url)
    try:
        account = await funded(engine, 1_000, name="stuck")
        writer_pid = engine.writer.connection.get_server_pid()
        locking = blocker.transaction()
        await locking.start()
        await blocker.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account.id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stuck = [asyncio.ensure_future(engine.deposit(account.id, 1)),
                 asyncio.ensure_future(engine.deposit(account.id, 2, idempotency_key="stuck-key"))]
        cancelled = asyncio.ensure_future(engine.deposit(account.id, 3))
        await wait_until_writer_waits_on_a_lock(engine, writer_pid)
        cancelled.cancel()
        outcomes = await asyncio.gather(*stuck, return_exceptions=True)
        waited = loop.time() - started
        assert all(isinstance(o, Unavailable) and o.code == "operation_timeout" for o in outcomes), outcomes
        assert 0.4 <= waited < 5.0, waited
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await locking.rollback()
        # The timed-out (and the cancelled) operations were already with their actor: they
        # commit late; a retry with the key finds its stored result.
        await eventually(lambda: _balance_is(engine, account.id, 1_000 + 1 + 2 + 3), what="the late commits")
        assert (await engine.deposit(account.id, 10)).balance_after == 1_016
        retried = await engine.deposit(account.id, 2, idempotency_key="stuck-key")
        # (the three late ones commit in any order: 1,000 + 2 + any of the other two)
        assert retried.amount == 2 and retried.balance_after in {1_002, 1_003, 1_005, 1_006}
    finally:
        await blocker.close()
        await engine.stop()


async def _balance_is(engine: Engine, account_id: str, balance: int) -> bool:
    return (await engine.get_account(account_id)).balance == balance


async def test_stop_ends_even_when_a_supervisor_loop_misses_its_cancellation(database_url):
    """Python 3.11's `asyncio.wait_for` can swallow a cancellation that arrives as its
    inner wait completes. The database supervisor and the webhook feed reader loop until
    stopped, so `stop()` must not depend on the cancellation reaching them (a full test
    run once hung here for good)."""
    engine = Engine(engine_settings(database_url))
    await engine.start()
    swallowed = asyncio.Event()

    async def tick_that_swallows_a_cancellation() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.set()   # as wait_for does when its inner wait wins the race

    engine.availability._tick = tick_that_swallows_a_cancellation
    await asyncio.sleep(0.6)   # the supervisor's next tick is now in the patched call
    await asyncio.wait_for(engine.stop(), timeout=8)
    assert swallowed.is_set()


@pytest.mark.parametrize("call", [
    lambda engine, a, b: engine.deposit_request(a, DepositRequest(amount="7")),
    lambda engine, a, b: engine.deposit_request(a, DepositRequest(amount=-500)),
    lambda engine, a, b: engine.deposit_request(a, DepositRequest(amount=1.5)),
    lambda engine, a, b: engine.withdraw_request(a, WithdrawalRequest(amount=0)),
    lambda engine, a, b: engine.book_trade_request(a, TradeRequest(kind="bogus", amount=5)),
    lambda engine, a, b: engine.transfer_request(TransferRequest(from_account=a, to_account=b, amount=-300)),
    lambda engine, a, b: engine.transfer_request({"from_account": a, "to_account": b, "amount": 3}),
    lambda engine, a, b: engine.deposit_request(a, WithdrawalRequest(amount=3)),
], ids=["string-amount", "negative-deposit", "float-amount", "zero-withdrawal", "unknown-trade-kind",
        "negative-transfer", "dict-not-struct", "wrong-struct"])
async def test_a_request_struct_built_in_code_is_checked_like_a_decoded_one(engine, call):
    # A Struct's constructor checks nothing: these used to crash the account's actor
    # (six in a minute quarantined the account) or reach the database (decision 87).
    a = (await engine.create_account(name="a", type="revenue", owner="ann")).id
    b = (await engine.create_account(name="b", type="revenue", owner="ann")).id
    await engine.deposit(a, 1_000)
    for _ in range(7):   # past the supervisor's restart limit, had each one crashed the actor
        with pytest.raises(ValidationFailed):
            await call(engine, a, b)
    status = await engine.supervisor_status()
    assert status["restarts_total"] == 0 and not status["quarantined"], status
    assert (await engine.deposit_request(a, DepositRequest(amount=5))).balance_after == 1_005
    assert (await engine.transfer_request(TransferRequest(from_account=a, to_account=b, amount=5))).amount == 5
