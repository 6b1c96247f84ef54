"""Idempotency on the operation path (issue 10): no read of the key table before a keyed
operation; the key's unique index is the check at commit; a refused retry of an operation
that committed before still gets its original result; keys expire after the retention
period. Real actors, writer and PostgreSQL."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import msgspec

import pytest

from actors.api import Engine
from engine.errors import IdempotencyKeyReused, ValidationFailed
from tests.conftest import engine_settings, eventually
from tests.test_engine import checked_books, entry_count


async def funded(engine: Engine, balance: int, type: str = "revenue"):
    account = await engine.create_account(name="keys", type=type, owner="kim")
    if balance:
        await engine.deposit(account.id, balance)
    return account


class CountingLookups:
    """Counts the engine's reads of the key table (the real store function still runs)."""

    def __init__(self, engine: Engine):
        self.calls = 0
        self._original = engine.store.idempotent_response

        async def counted(key):
            self.calls += 1
            return await self._original(key)

        engine.store.idempotent_response = counted


async def test_keyed_operations_commit_without_reading_the_key_table(engine):
    source = await funded(engine, 100_000)
    target = await funded(engine, 0)
    lookups = CountingLookups(engine)
    results = await asyncio.gather(*(engine.transfer(source.id, target.id, 10, idempotency_key=f"k-{n}")
                                     for n in range(50)))
    await engine.deposit(target.id, 5, idempotency_key="k-deposit")
    assert lookups.calls == 0
    assert len({transfer.id for transfer in results}) == 50
    assert (await engine.get_account(target.id)).balance == 505


async def test_a_retry_after_the_first_attempt_committed_gets_the_stored_result_and_moves_nothing(engine):
    source = await funded(engine, 10_000)
    target = await funded(engine, 0)
    first = await engine.transfer(source.id, target.id, 2_500, memo="rent", idempotency_key="late-retry")
    # The first attempt is no longer in flight: the retry is decided again and its batch
    # meets the committed key at commit.
    retries = await asyncio.gather(*(engine.transfer(source.id, target.id, 2_500, memo="rent",
                                                     idempotency_key="late-retry") for _ in range(8)))
    assert all(retry == first for retry in retries)
    assert (await engine.get_account(source.id)).balance == 7_500
    assert (await engine.get_account(target.id)).balance == 2_500
    assert await checked_books(engine.store.fetch, [source.id, target.id]) == {source.id: 7_500, target.id: 2_500}


async def test_other_operations_in_a_batch_with_a_replayed_key_still_commit(engine):
    source = await funded(engine, 10_000)
    target = await funded(engine, 0)
    first = await engine.deposit(target.id, 100, idempotency_key="replayed")
    outcomes = await asyncio.gather(
        engine.deposit(target.id, 100, idempotency_key="replayed"),
        *(engine.transfer(source.id, target.id, 1, idempotency_key=f"fresh-{n}") for n in range(20)))
    assert outcomes[0] == first
    assert (await engine.get_account(target.id)).balance == 120
    assert await checked_books(engine.store.fetch, [source.id, target.id]) == {source.id: 9_980, target.id: 120}


async def test_a_retry_that_the_rules_would_now_refuse_returns_the_original_result(engine):
    account = await funded(engine, 3_000)
    first = await engine.withdraw(account.id, 3_000, idempotency_key="empty-it")
    # Deciding again would be insufficient_funds: the stored result answers instead.
    assert await engine.withdraw(account.id, 3_000, idempotency_key="empty-it") == first
    with pytest.raises(IdempotencyKeyReused):
        await engine.withdraw(account.id, 2_999, idempotency_key="empty-it")
    assert (await engine.get_account(account.id)).balance == 0
    assert await entry_count(engine, account.id) == 2


async def test_keys_older_than_the_retention_are_purged_and_then_run_anew(database_url):
    engine = Engine(engine_settings(database_url, idempotency_key_retention_s=1.0))
    await engine.start()
    try:
        account = await funded(engine, 0)
        await engine.deposit(account.id, 700, idempotency_key="short-lived")
        assert await engine.purge_expired_keys() == 0          # not expired yet
        assert (await engine.deposit(account.id, 700, idempotency_key="short-lived")).balance_after == 700
        await engine.store.fetch("SELECT pg_sleep(1.1)")
        assert await engine.purge_expired_keys() == 1
        rows = await engine.store.fetch("SELECT count(*) AS n FROM idempotency_keys WHERE key = 'short-lived'")
        assert rows[0]["n"] == 0
        again = await engine.deposit(account.id, 700, idempotency_key="short-lived")
        assert again.balance_after == 1_400                      # a new deposit
    finally:
        await engine.stop()


async def test_keys_inside_the_retention_survive_the_purge(engine):
    account = await funded(engine, 0)
    first = await engine.deposit(account.id, 700, idempotency_key="kept")
    assert await engine.purge_expired_keys() == 0
    assert await engine.deposit(account.id, 700, idempotency_key="kept") == first
    assert (await engine.get_account(account.id)).balance == 700


async def test_a_retry_of_a_key_the_engine_does_not_remember_is_caught_by_the_key_table_at_commit(engine):
    source = await funded(engine, 10_000)
    target = await funded(engine, 0)
    first = await engine.transfer(source.id, target.id, 2_500, idempotency_key="forgotten")
    engine.keys.recent.clear()   # as for a key older than the engine's memory of recent keys
    lookups = CountingLookups(engine)
    assert await engine.transfer(source.id, target.id, 2_500, idempotency_key="forgotten") == first
    assert lookups.calls == 0     # answered from the conflict at commit, not from a read first
    # The accounts reload after the replayed decision (503 meanwhile, safe to retry); then
    # they work on, and another request under the key is refused.
    await eventually(lambda: _transfers(engine, source.id, target.id), what="the accounts to take writes again")
    engine.keys.recent.clear()
    with pytest.raises(IdempotencyKeyReused):
        await engine.transfer(source.id, target.id, 2_501, idempotency_key="forgotten")
    await eventually(lambda: engine.get_account(source.id), what="the source to answer")
    assert await checked_books(engine.store.fetch, [source.id, target.id]) == {source.id: 7_499, target.id: 2_501}


async def _transfers(engine, source, target):
    from engine.errors import Unavailable
    try:
        await engine.transfer(source, target, 1)
        return True
    except Unavailable:
        return False


async def test_the_engine_remembers_recent_keys_across_a_restart(engine, database_url):
    account = await funded(engine, 0)
    first = await engine.deposit(account.id, 100, idempotency_key="remembered")
    await engine.stop()
    restarted = Engine(engine_settings(database_url))
    await restarted.start()
    try:
        assert "remembered" in restarted.keys.recent
        assert await restarted.deposit(account.id, 100, idempotency_key="remembered") == first
        assert (await restarted.get_account(account.id)).balance == 100
    finally:
        await restarted.stop()


@pytest.mark.parametrize("key", ["\x00", "", " ", "   ", "ключ", "tab\tkey", "x" * 201])
async def test_the_embedding_api_refuses_the_keys_http_refuses_before_anything_is_written(engine, key):
    # A NUL used to reach PostgreSQL and come back as a 503 `write_rejected` ("retry"),
    # and blank or non-ASCII keys were taken in-process though HTTP refuses them.
    account = await funded(engine, 0)
    with pytest.raises(ValidationFailed) as refused:
        await engine.deposit(account.id, 5, idempotency_key=key)
    assert refused.value.details == {"field": "Idempotency-Key"}
    assert await entry_count(engine, account.id) == 0
    accepted = await engine.deposit(account.id, 5, idempotency_key="x" * 200)
    assert accepted.balance_after == 5


async def test_an_operation_whose_event_is_its_entries_stores_them_once_and_replays_the_same_bytes(engine):
    """A deposit's, a trade's and a transfer's event carry exactly their entries: the event
    stores no copy of them (migration 0009), and the feed and a retry of the key still
    answer with the bytes of the first reply. A transfer between two owners stores each
    owner's share, which its entries alone would not tell."""
    source = await funded(engine, 10_000)
    target = await funded(engine, 0)
    stranger = await engine.create_account(name="other", type="revenue", owner="olga")
    replies = {"k-dep": await engine.deposit(target.id, 40, memo="top up", idempotency_key="k-dep"),
               "k-trade": await engine.book_trade(target.id, kind="premium", amount=7, idempotency_key="k-trade"),
               "k-xfr": await engine.transfer(source.id, target.id, 300, memo="rent", idempotency_key="k-xfr"),
               "k-owners": await engine.transfer(source.id, stranger.id, 5, idempotency_key="k-owners")}
    for key, reply in replies.items():
        stored = await engine.store.idempotent_response(key)
        assert stored is not None and stored[1] == msgspec.json.encode(reply), key
    rows = await engine.store.fetch("SELECT seq, type, correlation_id, payload IS NULL AS derived FROM events "
                                    "WHERE type IN ('transaction.posted', 'transfer.posted') ORDER BY seq")
    mine = [row for row in rows if row["correlation_id"] in (None, replies["k-xfr"].id, replies["k-owners"].id)]
    by_correlation = {}
    for row in mine:
        by_correlation.setdefault(row["correlation_id"], []).append(row["derived"])
    assert by_correlation[None] and all(by_correlation[None])   # every deposit and trade
    assert by_correlation[replies["k-xfr"].id] == [True]
    assert by_correlation[replies["k-owners"].id] == [False, False]
    feed = {event.seq: event for event in await engine.events_page(after=rows[0]["seq"] - 1, limit=500)}
    transfer_event = next(feed[row["seq"]] for row in mine if row["correlation_id"] == replies["k-xfr"].id)
    assert bytes(transfer_event.payload) == msgspec.json.encode(replies["k-xfr"])
    for key in ("k-dep", "k-trade"):
        event = next(e for e in feed.values() if e.type == "transaction.posted"
                     and msgspec.json.decode(e.payload)["id"] == replies[key].id)
        assert bytes(event.payload) == msgspec.json.encode(replies[key])
    for again in (await engine.deposit(target.id, 40, memo="top up", idempotency_key="k-dep"),
                  await engine.transfer(source.id, target.id, 300, memo="rent", idempotency_key="k-xfr")):
        assert again in replies.values()
    assert (await engine.get_account(target.id)).balance == 347


@pytest.mark.parametrize("zone", [timezone(timedelta(hours=2)), None], ids=["plus-two-hours", "naive"])
async def test_a_clock_not_in_utc_still_replays_and_feeds_the_bytes_of_the_reply(database_url, zone):
    """Entries come back from the database in UTC: an event is rebuilt from them only
    when its times were in UTC, so an `Engine` given another clock stores its payloads
    (found by a reviewer: a +02:00 clock's replies said +02:00, their rebuilds Z)."""
    async with Engine(engine_settings(database_url), clock=lambda: datetime.now(zone)) as engine:
        source = await funded(engine, 1_000)
        target = await funded(engine, 0)
        replies = [await engine.deposit(target.id, 40, idempotency_key="tz-dep"),
                   await engine.transfer(source.id, target.id, 300, idempotency_key="tz-xfr")]
        for key, reply in zip(("tz-dep", "tz-xfr"), replies):
            stored = await engine.store.idempotent_response(key)
            assert stored is not None and stored[1] == msgspec.json.encode(reply), key
        feed = {msgspec.json.decode(event.payload).get("id"): bytes(event.payload)
                for event in await engine.events_page(after=0, limit=500)}
        assert [feed[reply.id] for reply in replies] == [msgspec.json.encode(reply) for reply in replies]
