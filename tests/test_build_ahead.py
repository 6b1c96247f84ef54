"""The writer builds the next batch while the current one commits (decision 84), on the
heads the current one will leave. Against the real database: a batch built ahead is
written only if the batch before it committed exactly as built; otherwise its operations
are rebuilt, so the audit chain, the event numbers and the books stay whole."""
from __future__ import annotations

import asyncio

from persistence import store
from tests.test_engine import checked_books, funded

HELD = 40   # operations that queue while the first batch is held: more than a cohort


class HeldBatch:
    """`store.write_batch`, with the first batch written after `arm()` held until
    `release()` (so the next cohort queues and is built ahead meanwhile)."""

    def __init__(self, monkeypatch):
        self.original = store.write_batch
        self.armed = False
        self.held = asyncio.Event()
        self.gate = asyncio.Event()
        monkeypatch.setattr(store, "write_batch", self.write_batch)

    def arm(self) -> None:
        self.armed = True

    async def write_batch(self, connection, batch) -> None:
        if self.armed:
            self.armed = False
            self.held.set()
            await self.gate.wait()
        await self.original(connection, batch)


async def _whole(engine, account_ids) -> dict[str, int]:
    """The books, the audit chain and the event numbers are whole; returns the balances."""
    balances = await checked_books(engine.store.fetch, account_ids)
    verification = await engine.security.verify_audit()
    assert verification.valid, verification
    seqs = [row["seq"] for row in await engine.store.fetch("SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
    return balances


async def _accounts(engine, count: int, amount: int) -> list[str]:
    return [(await funded(engine, amount, name=f"ahead{n}")).id for n in range(count)]


async def _held_then_rest(engine, monkeypatch, ids, held_transfer, prefix: str) -> list:
    """The batch of `held_transfer` (a coroutine factory) is held in flight while HELD
    more transfers (7 each, between fresh pairs of `ids`) are decided and built ahead;
    then it goes. Returns [its outcome, *theirs]."""
    held = HeldBatch(monkeypatch)
    built = engine.writer.built_ahead
    held.arm()
    first = asyncio.ensure_future(held_transfer())
    await held.held.wait()
    rest = [asyncio.ensure_future(engine.transfer(ids[2 + 2 * n], ids[3 + 2 * n], 7, idempotency_key=f"{prefix}-{n}"))
            for n in range(HELD)]
    while engine.writer.built_ahead == built:   # the next cohort is decided and built ahead
        await asyncio.sleep(0.001)
    held.gate.set()
    return await asyncio.gather(first, *rest)


def _check_rest(balances: dict[str, int], ids: list[str]) -> None:
    assert balances[ids[0]] == 990 and balances[ids[1]] == 1_010
    assert all(balances[ids[2 + 2 * n]] == 993 and balances[ids[3 + 2 * n]] == 1_007 for n in range(HELD))


async def test_a_batch_built_ahead_is_written_once_the_batch_before_it_commits(engine, monkeypatch):
    ids = await _accounts(engine, 2 * HELD + 2, 1_000)
    discarded = engine.writer.ahead_discarded
    results = await _held_then_rest(
        engine, monkeypatch, ids, lambda: engine.transfer(ids[0], ids[1], 10, idempotency_key="held-first"), "ahead")
    assert engine.writer.ahead_discarded == discarded
    assert [r.amount for r in results] == [10] + [7] * HELD
    _check_rest(await _whole(engine, ids), ids)
    # A retry of any of them is answered with the stored result, not decided again.
    assert await engine.transfer(ids[2], ids[3], 7, idempotency_key="ahead-0") == results[1]


async def test_a_batch_built_ahead_of_a_batch_that_did_not_commit_is_rebuilt(engine, monkeypatch):
    """The held batch meets a key committed before (the engine forgot it): nothing of it
    commits, so the batch built on the heads it would have left must not be written."""
    ids = await _accounts(engine, 2 * HELD + 2, 1_000)
    original = await engine.transfer(ids[0], ids[1], 10, idempotency_key="committed-before")
    engine.keys.recent.clear()   # as for a key older than the engine's memory of recent keys
    discarded = engine.writer.ahead_discarded
    results = await _held_then_rest(
        engine, monkeypatch, ids, lambda: engine.transfer(ids[0], ids[1], 10, idempotency_key="committed-before"),
        "next")
    assert results[0] == original                       # the stored result, not a second transfer
    assert engine.writer.ahead_discarded == discarded + 1
    assert [r.amount for r in results[1:]] == [7] * HELD
    _check_rest(await _whole(engine, ids), ids)
