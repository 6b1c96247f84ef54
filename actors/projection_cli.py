"""Prints a projection's yearly table.

    .venv/bin/python -m actors.projection_cli --capital 300000 --years 10 --rates 150,100,50

Capital in dollars; rates are weekly returns in basis points for generation, revenue and
compounding accounts. Rules come from the configuration (config/default.toml,
ALLUSE_CONFIG), so the table uses the same thresholds as the live engine."""
from __future__ import annotations

import argparse
import sys
import time
from datetime import date

from actors.settings import ConfigError, load_settings
from engine.projection import project


def _money(cents: int) -> str:
    return f"${cents / 100:,.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capital", type=float, default=300_000.0, help="initial capital in dollars")
    parser.add_argument("--years", type=int, default=10)
    parser.add_argument("--rates", default="150,100,50", help="weekly bps: generation,revenue,compounding")
    parser.add_argument("--start", type=date.fromisoformat, default=date.today(), help="start date (ISO)")
    arguments = parser.parse_args(argv)
    try:
        rules = load_settings().rules
        generation, revenue, compounding = (int(v) for v in arguments.rates.split(","))
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not 1 <= arguments.years <= 50 or not 0 < arguments.capital <= 10**13:
        print("error: years must be 1..50 and capital positive", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = project(initial_capital=round(arguments.capital * 100), weeks=52 * arguments.years,
                     weekly_return_bps={"generation": generation, "revenue": revenue, "compounding": compounding},
                     start=arguments.start, rules=rules)
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"ALL-USE projection: {_money(result.initial_capital)} at {generation}/{revenue}/{compounding} bps "
          f"weekly (Gen/Rev/Com), {arguments.years} years, fork at +{_money(rules.fork_threshold_cents)}, "
          f"merge at {_money(rules.merge_threshold_cents)}")
    print(f"{'year':>4}  {'total value':>18}  {'income':>16}  {'forks':>5}  {'merges':>6}  {'active units':>12}")
    for year in result.years:
        print(f"{year.year:>4}  {_money(year.total_value):>18}  {_money(year.income):>16}  {year.forks:>5}  "
              f"{year.merges:>6}  {year.active_units:>12}")
    print(f"units created {result.units_created}, merged {result.units_merged}; computed in {elapsed_ms:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
