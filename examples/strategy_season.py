"""A strategy engine's season, embedded: open a portfolio, book a weekly premium on every
active account for a season, and print the fork and merge events the engine publishes.

    .venv/bin/python examples/strategy_season.py [--weeks 52]

It uses lower thresholds than the defaults (fork at +$20,000, merge at $25,000) so a
single season shows both; the rules are the same functions either way. Data goes to the
embedded PostgreSQL in ./.alluse-example unless DATABASE_URL is set."""
import argparse
import asyncio
import os
from datetime import date, timedelta

import msgspec

from actors.api import Engine
from actors.settings import load_settings
from engine.growth import weekly_premium

WEEKLY_RETURN_BPS = {"generation": 150, "revenue": 100, "compounding": 50}


async def main(weeks: int) -> None:
    settings = load_settings(overrides={
        "database": {"data_dir": os.environ.get("ALLUSE_DATA_DIR", ".alluse-example")},
        "rules": {"fork_threshold_cents": 20_000_00, "merge_threshold_cents": 25_000_00}})
    async with Engine(settings) as engine:
        season_start = date.today() - timedelta(weeks=weeks)
        portfolio = await engine.create_portfolio(name="season demo", owner="strategy-demo",
                                                  initial_capital=300_000_00, opened_on=season_start)
        print(f"portfolio {portfolio.id}: {[(a.name, a.balance / 100) for a in portfolio.accounts]}")

        def on_event(event) -> None:
            if event.type in ("portfolio.forked", "portfolio.merged"):
                payload = msgspec.json.decode(event.payload)
                amount = payload.get("amount", 0) / 100
                print(f"  event #{event.seq}: {event.type:<17} unit {event.portfolio_id}  ${amount:,.2f}")

        subscription = engine.subscribe(on_event)
        for week in range(1, weeks + 1):
            effective = season_start + timedelta(weeks=week)
            tree = await engine.portfolio_tree(portfolio.id)
            accounts = [a for node in tree.nodes for a in node.accounts if a.status == "active"]
            for account in accounts:
                current = await engine.get_account(account.id)
                if current.status != "active":
                    continue
                premium = weekly_premium(current.balance, engine.rules.cash_buffer_bps[current.type],
                                         WEEKLY_RETURN_BPS[current.type])
                if premium > 0:
                    await engine.book_trade(current.id, kind="premium", amount=premium, effective_date=effective,
                                            idempotency_key=f"{portfolio.id}-{current.id}-week-{week}")
        await asyncio.sleep(0.5)  # let the subscription print the last events
        subscription.cancel()
        tree = await engine.portfolio_tree(portfolio.id)
        print(f"after {weeks} weeks: total ${tree.totals.balance / 100:,.2f}, "
              f"units active {tree.units_active}, merged {tree.units_merged}")
        print_report(await engine.portfolio_analytics(portfolio.id))


def print_report(report) -> None:
    """The analytics an operator reads after a season (docs/analytics.md)."""
    performance, risk, forecast, growth = report.performance, report.risk, report.forecast, report.growth
    print(f"analytics of {report.portfolio_id} over {performance.weeks} weeks:")
    print(f"  time-weighted return {performance.time_weighted_return:.2%}, annualized "
          f"{performance.annualized_return:.2%}, volatility {performance.volatility:.2%}, "
          f"max drawdown {performance.max_drawdown:.2%}")
    print(f"  income: premiums ${performance.income['premium'] / 100:,.2f}, net ${performance.income['net'] / 100:,.2f};"
          f" mean weekly return {performance.mean_weekly_return:.3%} vs target "
          f"{performance.target_weekly_return:.3%}")
    print(f"  risk score {risk.score}/100, flags {risk.flags or 'none'}, largest account share "
          f"{risk.concentration:.1%}; trend {report.trend.label}")
    print(f"  growth: {growth.units_created} units forked (${growth.forked_cents / 100:,.2f}), "
          f"{growth.units_merged} merged (${growth.merged_cents / 100:,.2f})")
    values = ", ".join(f"{weeks} weeks ${cents / 100:,.2f}" for weeks, cents in forecast.total_value.items())
    print(f"  forecast: {values}; next fork in {forecast.weeks_to_next_fork} weeks, next merge in "
          f"{forecast.weeks_to_next_merge} weeks")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--weeks", type=int, default=52)
    asyncio.run(main(parser.parse_args().weeks))
