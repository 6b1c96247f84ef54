"""Embedding the engine in your own process (what the strategy engine does).

    .venv/bin/python examples/embed_basic.py

Uses the embedded PostgreSQL in ./.alluse-example unless DATABASE_URL is set."""
import asyncio
import os
import uuid

from actors.api import Engine
from actors.settings import load_settings
from engine.errors import Refused


async def main() -> None:
    settings = load_settings(overrides={"database": {"data_dir": os.environ.get("ALLUSE_DATA_DIR",
                                                                                 ".alluse-example")}})
    async with Engine(settings) as engine:
        revenue = await engine.create_account(name="Rev-Acc", type="revenue", owner="ann")
        generation = await engine.create_account(name="Gen-Acc", type="generation", owner="ann")
        # A returned value means the change is committed in PostgreSQL.
        await engine.deposit(revenue.id, 250_000_00, idempotency_key=str(uuid.uuid4()))
        premium = await engine.book_trade(revenue.id, kind="premium", amount=2_500_00)
        print("premium booked; balance after:", premium.balance_after)
        transfer = await engine.transfer(revenue.id, generation.id, 10_000_00, memo="rebalance")
        print("transfer", transfer.id, "legs:", [(leg.account_id, leg.direction, leg.amount) for leg in transfer.legs])
        try:
            await engine.withdraw(revenue.id, 10**12)
        except Refused as refusal:
            print("refused:", refusal.code)
        page = await engine.list_transactions(revenue.id, limit=10)
        for entry in page.items:
            print(f"  {entry.kind:<10} {entry.direction:<6} {entry.amount:>12} -> {entry.balance_after}")


if __name__ == "__main__":
    asyncio.run(main())
