"""The workloads of the harness: what each caller does, and how it chooses accounts.

A `Workload` names one operation and an account choice; `pick(rng)` draws the arguments
of one call (indexes into the session's accounts, an amount). Every driver (the engine
in-process, over HTTP, the naive design, the bare ceiling) maps the same picks onto its
own calls, so all of them see exactly the same stream of work.

Account choice is uniform, or Zipf-skewed (P(rank k) ~ 1 / k**s): with s = 1.1 over
1,000 accounts the 10 hottest take ~48% of the draws.
"""
from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

ACCOUNTS = 1_000                      # accounts the transfers, deposits, trades and reads choose among
INITIAL_BALANCE_CENTS = 1_000_000     # each funded with $10,000
AMOUNT_MIN_CENTS, AMOUNT_MAX_CENTS = 1, 100   # small: insufficient funds stays rare
ZIPF_S = 1.1
PORTFOLIOS_FORKING = 1_000            # portfolios whose Gen-Accs the fork-heavy workload credits
PORTFOLIO_CAPITAL_CENTS = 300_000_00
PREMIUM_FORKING_CENTS = 60_000_00     # above the default $50,000 fork threshold: every premium forks

OPERATIONS = ("create", "deposit", "transfer", "read", "fork", "trade")
# The trades workload's mix of kinds (a week of the strategy engine is mostly premiums):
# 80% premiums, 15% losses, 5% fees. A loss or a fee also queues the account's drawdown
# check (`actors/risk.py`), which reads its ledger: part of what a trade costs.
TRADE_KINDS = ("premium",) * 16 + ("loss",) * 3 + ("fee",)


@lru_cache(maxsize=8)
def _zipf_cumulative(accounts: int, s: float) -> tuple[float, ...]:
    return tuple(itertools.accumulate(1.0 / (rank ** s) for rank in range(1, accounts + 1)))


@dataclass(frozen=True)
class Workload:
    name: str
    operation: str                    # one of OPERATIONS
    accounts: int = ACCOUNTS
    zipf_s: float = 0.0               # 0: uniform account choice
    amount_min: int = AMOUNT_MIN_CENTS
    amount_max: int = AMOUNT_MAX_CENTS
    # Each call carries its own Idempotency-Key, as the strategy engine sends them.
    keyed: bool = False

    def __post_init__(self) -> None:
        assert self.operation in OPERATIONS, self.operation
        assert self.accounts >= 2 and self.zipf_s >= 0

    @property
    def skewed(self) -> bool:
        return self.zipf_s > 0

    def account(self, rng: random.Random) -> int:
        if not self.zipf_s:
            return rng.randrange(self.accounts)
        cumulative = _zipf_cumulative(self.accounts, self.zipf_s)
        return min(self.accounts - 1, bisect.bisect_left(cumulative, rng.random() * cumulative[-1]))

    def amount(self, rng: random.Random) -> int:
        return rng.randint(self.amount_min, self.amount_max)

    def pick(self, rng: random.Random) -> tuple:
        """transfer: (source, target, amount), distinct accounts; deposit: (account,
        amount); trade: (account, amount, index into TRADE_KINDS); read: (account,);
        fork: (portfolio,); create: ()."""
        match self.operation:
            case "transfer":
                source = self.account(rng)
                target = self.account(rng)
                while target == source:
                    target = self.account(rng)
                return source, target, self.amount(rng)
            case "deposit":
                return self.account(rng), self.amount(rng)
            case "trade":
                return self.account(rng), self.amount(rng), rng.randrange(len(TRADE_KINDS))
            case "read":
                return (self.account(rng),)
            case "fork":
                return (rng.randrange(PORTFOLIOS_FORKING),)
            case _:
                return ()

    def hot_share(self, top: int = 10) -> float:
        """Share of the draws that go to the `top` hottest accounts."""
        if not self.zipf_s:
            return min(top, self.accounts) / self.accounts
        cumulative = _zipf_cumulative(self.accounts, self.zipf_s)
        return cumulative[min(top, self.accounts) - 1] / cumulative[-1]


# Money moves carry an idempotency key (the strategy engine must send one with each);
# `transfers-unkeyed` shows what the key costs.
WORKLOADS = {w.name: w for w in (
    Workload("create-accounts", "create"),
    Workload("deposits", "deposit", keyed=True),
    Workload("trades", "trade", keyed=True),
    Workload("transfers-uniform", "transfer", keyed=True),
    Workload("transfers-zipf", "transfer", zipf_s=ZIPF_S, keyed=True),
    Workload("transfers-unkeyed", "transfer"),
    Workload("reads", "read"),
    Workload("forks", "fork", keyed=True),
)}
TRANSFERS = ("transfers-uniform", "transfers-zipf")
# An aiohttp hello world on the same box (`perf.hello`): the yardstick of HTTP figures.
HELLO = Workload("hello-world", "read")
