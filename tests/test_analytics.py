"""Analytics of the functional core (`engine/analytics.py`, SPEC section 3 "Analytics"):
known series with known answers, built by hand as `Entry` lists (effective date, kind,
direction, amount, balance after), and hypothesis properties: returns are invariant to
flows at the start of a week and to the scale of the money, every weekly return is the
week's Modified Dietz return (an exact reference in `dietz_reference`), drawdowns stay
between 0 and 1, and the forecast of a constant-return account matches the projection
(`engine.projection.project`). The comparison with the reference library
(empyrical-reloaded) is `tests/test_analytics_reference.py`.

Most series hold an account's weekly capital fixed at `BASE` cents: each week books its
trade and a flow on the next Monday (a deposit or a withdrawal, which is never a
return, weighted in full) puts the balance back, so every weekly return is exactly
`net / BASE` and the expected figures are exact."""
from __future__ import annotations

import math
import statistics
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import analytics
from engine.analytics import Entry
from engine.growth import (
    merge_date,
    capital_split,
    merge_due,
    merge_in,
    merge_steps,
    open_portfolio,
)
from engine.model import Account, BookTrade, LegPosted, Portfolio
from engine.projection import Book, project
from engine.rules import DEFAULT_RULES, Rules, decide

MONDAY = date(2025, 1, 6)  # weeks are ISO weeks: every series starts on a Monday
NOW = datetime(2025, 1, 6, 12, tzinfo=timezone.utc)
BASE = 100_000_000  # $1,000,000 in cents
DIRECTIONS = {"deposit": "credit", "withdrawal": "debit", "premium": "credit", "loss": "debit", "fee": "debit"}
TARGET = {t: bps / 10_000 for t, bps in DEFAULT_RULES.weekly_target_bps.items()}
LIMIT = {t: bps / 10_000 for t, bps in DEFAULT_RULES.drawdown_limit_bps.items()}


# -- builders ---------------------------------------------------------------------------
class Ledger:
    """An account's entries in ledger (and date) order, with the running balance."""

    def __init__(self, start: date = MONDAY) -> None:
        self.start = start
        self.entries: list[Entry] = []
        self.balance = 0

    def day(self, week: int, weekday: int = 0) -> date:
        return self.start + timedelta(days=7 * week + weekday)

    def add(self, week: int, kind: str, amount: int, direction: str | None = None, weekday: int = 0) -> "Ledger":
        direction = direction or DIRECTIONS[kind]
        assert amount > 0
        self.balance += amount if direction == "credit" else -amount
        assert self.balance >= 0, "a hand-built ledger never goes below zero"
        self.entries.append(Entry(self.day(week, weekday), kind, direction, amount, self.balance))
        return self

    def trade(self, week: int, net: int, weekday: int = 0) -> "Ledger":
        if net > 0:
            self.add(week, "premium", net, weekday=weekday)
        elif net < 0:
            self.add(week, "loss", -net, weekday=weekday)
        return self

    def restore(self, week: int, balance: int, weekday: int = 6) -> "Ledger":
        """A flow that puts the balance back to `balance`."""
        if self.balance < balance:
            self.add(week, "deposit", balance - self.balance, weekday=weekday)
        elif self.balance > balance:
            self.add(week, "withdrawal", self.balance - balance, weekday=weekday)
        return self

    def __repr__(self) -> str:
        return "Ledger([\n" + "".join(f"    {e!r},\n" for e in self.entries) + "])"

    @property
    def last_day(self) -> date:
        return self.entries[-1].effective_date


def constant_base(nets: list[int], base: int = BASE) -> Ledger:
    """Week k: a trade of nets[k] cents on Wednesday, then a flow back to `base`, so week
    k's return is exactly nets[k] / base. The flows are ones Modified Dietz weighs fully:
    the opening deposit on Monday of week 0 (and a week that starts at zero starts when
    the money arrives) and each flow back to `base` on the next Monday (weight 1: the
    next week's average capital is `base`). After the last week there is no flow back."""
    ledger = Ledger().add(0, "deposit", base)
    for week, net in enumerate(nets):
        if week:
            ledger.restore(week, base, weekday=0)
        ledger.trade(week, net, weekday=2)
    return ledger


def account(account_type: str = "revenue", balance: int = BASE, *, portfolio_id: str | None = None,
            baseline: int = 0, account_id: str = "acc_1", status: str = "active") -> Account:
    return Account(id=account_id, name=account_type, type=account_type, owner="ann", portfolio_id=portfolio_id,
                   root_portfolio_id=portfolio_id, balance=balance, baseline=baseline, status=status,
                   opened_on=MONDAY, created_at=NOW, updated_at=NOW)


def run(ledger: Ledger, account_type: str = "revenue", *, today: date | None = None, **kwargs):
    return analytics.account_analytics(account(account_type, ledger.balance), ledger.entries,
                                       today=today or ledger.last_day, **kwargs)


def returns_of(result) -> list[float]:
    return [row.weekly_return for row in result.weekly_returns if row.weekly_return is not None]


def round_half_away(value: Fraction) -> int:
    whole = math.floor(abs(value) + Fraction(1, 2))
    return whole if value >= 0 else -whole


# -- performance: known answers -----------------------------------------------------------
@pytest.mark.parametrize("weeks", [52, 10, 1])
def test_constant_one_percent_weekly_returns_annualize_to_1_01_to_the_52nd_minus_1(weeks):
    result = run(constant_base([BASE // 100] * weeks))
    perf = result.performance
    assert returns_of(result) == [0.01] * weeks
    assert perf.weeks == weeks
    assert perf.time_weighted_return == pytest.approx(1.01 ** weeks - 1, rel=1e-12)
    assert perf.annualized_return == pytest.approx(1.01 ** 52 - 1, rel=1e-12)
    assert perf.volatility == 0.0
    assert perf.sharpe is None  # no volatility, no Sharpe
    assert perf.max_drawdown == 0.0 and perf.current_drawdown == 0.0
    assert perf.mean_weekly_return == pytest.approx(0.01, rel=1e-12)
    assert result.risk.flags == []


def test_compounding_one_percent_weeks_without_any_flow_give_the_same_answer():
    """The balance compounds (no flows at all): each premium is 1% of the week's start
    balance up to a fraction of a cent, on a balance large enough that it does not show."""
    ledger = Ledger().add(0, "deposit", 10**15)
    for week in range(52):  # the opening week earns too: it starts with the deposit
        ledger.add(week, "premium", round(ledger.balance / 100), weekday=4)
    perf = run(ledger).performance
    assert perf.weeks == 52
    assert perf.time_weighted_return == pytest.approx(1.01 ** 52 - 1, rel=1e-9)
    assert perf.annualized_return == pytest.approx(1.01 ** 52 - 1, rel=1e-9)
    assert perf.volatility == pytest.approx(0.0, abs=1e-9)
    assert perf.max_drawdown == 0.0
    assert perf.income["premium"] == ledger.balance - 10**15


def test_the_weekly_target_is_the_account_types_and_meets_target_compares_the_mean():
    ledger = constant_base([BASE // 100] * 4)  # 1% a week
    for account_type, meets in (("generation", False), ("compounding", True)):
        perf = run(ledger, account_type).performance
        assert perf.target_weekly_return == TARGET[account_type]
        assert perf.meets_target is meets


def twelve_percent_loss() -> Ledger:
    """Four 1% weeks (the opening week the first), then a week losing 12% of its start
    balance."""
    ledger = Ledger().add(0, "deposit", 10**12)  # large enough that every amount is exact
    for week in range(4):
        assert ledger.balance % 100 == 0
        ledger.add(week, "premium", ledger.balance // 100)
    assert ledger.balance * 12 % 100 == 0
    ledger.add(4, "loss", ledger.balance * 12 // 100)
    return ledger


def test_one_twelve_percent_loss_week_is_a_twelve_percent_drawdown():
    ledger = twelve_percent_loss()
    result = run(ledger, today=ledger.day(6))  # then two flat weeks
    perf = result.performance
    assert returns_of(result) == pytest.approx([0.01, 0.01, 0.01, 0.01, -0.12, 0.0, 0.0], abs=1e-15)
    assert perf.max_drawdown == pytest.approx(0.12, abs=1e-12)
    assert perf.current_drawdown == pytest.approx(0.12, abs=1e-12)
    assert perf.time_weighted_return == pytest.approx(1.01 ** 4 * 0.88 - 1, rel=1e-12)


def test_a_twelve_percent_drawdown_flags_a_rev_acc_and_a_com_acc_but_not_a_gen_acc():
    ledger = twelve_percent_loss()
    assert run(ledger, "revenue").risk.flags == ["drawdown_breach"]       # limit 10%
    assert run(ledger, "compounding").risk.flags == ["drawdown_breach"]   # limit 7%
    assert run(ledger, "generation").risk.flags == []                     # limit 15%
    assert run(ledger, "revenue").risk.drawdown_limit == 0.10
    assert run(ledger, "generation").risk.drawdown_limit == 0.15


@pytest.mark.parametrize("account_type", ["generation", "revenue", "compounding"])
@pytest.mark.parametrize("start", [100, 1_000_000, 123_456_700])
def test_a_loss_of_exactly_the_types_limit_reaches_the_limit_and_flags_the_account(account_type, start):
    """'drawdown_breach when the current drawdown reaches the type's limit': a single
    week losing exactly 10% of a Rev-Acc (7% of a Com-Acc, 15% of a Gen-Acc) reaches it."""
    limit_bps = DEFAULT_RULES.drawdown_limit_bps[account_type]
    ledger = Ledger().add(0, "deposit", start).add(1, "loss", start * limit_bps // 10_000)
    result = run(ledger, account_type)
    assert result.performance.current_drawdown == pytest.approx(LIMIT[account_type], abs=1e-12)
    assert result.risk.flags == ["drawdown_breach"], (result.performance.current_drawdown, LIMIT[account_type])


def test_recovery_lowers_the_current_drawdown_below_the_maximum_and_clears_the_flag():
    ledger = twelve_percent_loss()
    ledger.add(6, "premium", ledger.balance * 3 // 100)  # 0.88 * 1.03 = 0.9064 of the peak
    perf = run(ledger).performance
    assert perf.max_drawdown == pytest.approx(0.12, abs=1e-12)
    assert perf.current_drawdown == pytest.approx(1 - 0.88 * 1.03, abs=1e-12)
    assert run(ledger, "revenue").risk.flags == []
    assert run(ledger, "compounding").risk.flags == ["drawdown_breach"]


def test_the_risk_score_follows_its_documented_formula():
    ledger = twelve_percent_loss()
    for account_type, portfolio_balance in (("revenue", None), ("generation", ledger.balance * 4),
                                            ("compounding", ledger.balance)):
        result = run(ledger, account_type, portfolio_balance=portfolio_balance)
        perf, limit, target = result.performance, LIMIT[account_type], TARGET[account_type]
        concentration = None if portfolio_balance is None else ledger.balance / portfolio_balance
        expected = round(60 * min(1.0, perf.current_drawdown / limit)
                         + 25 * min(1.0, perf.volatility / (2 * target * math.sqrt(52)))
                         + 15 * (concentration or 0.0))
        assert result.risk.concentration == concentration
        assert result.risk.score == expected
        assert 0 <= result.risk.score <= 100
    # a calm standalone account scores 0; one beyond every limit scores 100
    assert run(constant_base([0] * 4)).risk.score == 0
    wild = constant_base([BASE // 2, -BASE // 2, BASE // 2, -BASE // 2])
    assert run(wild, "revenue", portfolio_balance=wild.balance).risk.score == 100


def test_volatility_is_the_sample_standard_deviation_annualized_and_sharpe_is_the_mean_weekly_excess_over_it():
    nets = [2_000_000, 0, 1_000_000, -1_000_000, 3_000_000]  # 2%, 0%, 1%, -1%, 3%
    ledger = constant_base(nets)
    expected_returns = [n / BASE for n in nets]
    volatility = statistics.stdev(expected_returns) * math.sqrt(52)
    annualized = math.prod(1 + r for r in expected_returns) ** (52 / 5) - 1
    for risk_free_rate in (0.0, 0.04):
        perf = run(ledger, risk_free_rate=risk_free_rate).performance
        weekly_risk_free = (1 + risk_free_rate) ** (1 / 52) - 1
        excess = [r - weekly_risk_free for r in expected_returns]
        assert perf.volatility == pytest.approx(volatility, rel=1e-12)
        assert perf.annualized_return == pytest.approx(annualized, rel=1e-12)
        assert perf.sharpe == pytest.approx(statistics.fmean(excess) / statistics.stdev(excess) * math.sqrt(52),
                                            rel=1e-12)
        assert perf.return_over_volatility == pytest.approx((annualized - risk_free_rate) / volatility, rel=1e-12)
        assert perf.risk_free_rate == risk_free_rate
    assert run(constant_base([1_000_000])).performance.volatility == 0.0  # one week: no deviation


def test_income_totals_add_up_premiums_losses_and_fees_and_their_net():
    ledger = Ledger().add(0, "deposit", BASE)
    ledger.add(1, "premium", 500_00).add(1, "fee", 3_00, weekday=1).add(2, "loss", 200_00)
    ledger.add(2, "premium", 50_00, weekday=3).add(3, "fee", 1_00).add(3, "withdrawal", 10_000_00, weekday=4)
    result = run(ledger)
    assert result.performance.income == {"premium": 550_00, "loss": 200_00, "fee": 4_00, "net": 346_00}
    rows = result.weekly_returns
    assert [(r.premium, r.loss, r.fee, r.net_trade) for r in rows] == [
        (0, 0, 0, 0), (500_00, 0, 3_00, 497_00), (50_00, 200_00, 0, -150_00), (0, 0, 1_00, -1_00)]


# -- flows ---------------------------------------------------------------------------------
def dietz_reference(entries: list[Entry], week_start: date) -> Fraction | None:
    """The week's Modified Dietz return as docs/analytics.md states it, exactly: the net
    trade result over the start balance plus each flow weighted by the share of the week
    from the start of its day, (7 - d) / 7; a week starting at zero starts on the day its
    first money arrives (d0), each weight (7 - d) / (7 - d0). None when that average
    capital is not positive."""
    before = [e for e in entries if e.effective_date < week_start]
    inside = [e for e in entries if week_start <= e.effective_date < week_start + timedelta(7)]
    start = before[-1].balance_after if before else 0
    sign = {"credit": 1, "debit": -1}
    net = sum(sign[e.direction] * e.amount for e in inside if e.kind in ("premium", "loss", "fee"))
    flows = [(sign[e.direction] * e.amount, e.effective_date.weekday()) for e in inside
             if e.kind not in ("premium", "loss", "fee")]
    first = min((d for amount, d in flows if amount > 0), default=0)
    period = 7 if start > 0 else 7 - first
    capital = start + sum(amount * Fraction(7 - d, period) for amount, d in flows)
    return Fraction(net) / capital if capital > 0 else None


def test_deposits_withdrawals_transfers_forks_and_merges_are_flows_weighted_by_their_day():
    ledger = Ledger().add(0, "deposit", BASE)
    ledger.add(1, "deposit", 5_000_000).add(1, "premium", 1_000_000, weekday=2)           # weight 7/7
    ledger.add(2, "transfer", 20_000_000, "debit").add(2, "loss", 500_000, weekday=1)    # 7/7
    ledger.add(2, "transfer", 3_000_000, "credit", weekday=5)                            # 2/7
    ledger.add(3, "withdrawal", 7_000_000, weekday=1).add(3, "fork", 1_000_000, "debit", weekday=2)
    ledger.add(3, "fee", 12_345, weekday=3).add(3, "merge", 2_000_000, "credit", weekday=4)
    ledger.add(4, "premium", 777_777, weekday=6)
    result = run(ledger)
    starts = [0, BASE, BASE + 6_000_000, BASE + 6_000_000 - 20_500_000 + 3_000_000]
    starts.append(starts[3] - 7_000_000 - 1_000_000 - 12_345 + 2_000_000)
    nets = [0, 1_000_000, -500_000, -12_345, 777_777]
    capital = [Fraction(BASE), BASE + Fraction(5_000_000), starts[2] - 20_000_000 + Fraction(3_000_000 * 2, 7),
               starts[3] - Fraction(7_000_000 * 6, 7) - Fraction(1_000_000 * 5, 7) + Fraction(2_000_000 * 3, 7),
               Fraction(starts[4])]
    assert [r.start_balance for r in result.weekly_returns] == starts
    assert [r.net_trade for r in result.weekly_returns] == nets
    assert [r.flow for r in result.weekly_returns] == [BASE, 5_000_000, -17_000_000, -6_000_000, 0]
    assert [r.average_capital for r in result.weekly_returns] == [float(c) for c in capital]
    assert returns_of(result) == [float(n / c) for n, c in zip(nets, capital)]
    assert returns_of(result) == [float(dietz_reference(ledger.entries, r.week_start))
                                  for r in result.weekly_returns]
    assert result.performance.income["net"] == sum(nets)


def test_the_worked_modified_dietz_example_of_the_docs():
    """docs/analytics.md: $100,000 at the start of the week, $20,000 deposited on
    Wednesday, a $1,500 premium on Thursday, $7,000 withdrawn on Friday, a $20 fee on
    Saturday: r = 1,480 / (100,000 + 20,000 x 5/7 - 7,000 x 3/7) = 1.3299%."""
    ledger = Ledger().add(0, "deposit", 100_000_00)
    ledger.add(1, "deposit", 20_000_00, weekday=2).add(1, "premium", 1_500_00, weekday=3)
    ledger.add(1, "withdrawal", 7_000_00, weekday=4).add(1, "fee", 20_00, weekday=5)
    week = run(ledger).weekly_returns[1]
    assert (week.start_balance, week.flow, week.flow_cent_days) == (100_000_00, 13_000_00, 7_900_000)
    assert week.average_capital == pytest.approx(111_285_71.43, abs=0.01)
    assert week.weekly_return == 1_480_00 * 7 / (100_000_00 * 7 + 7_900_000)
    assert round(week.weekly_return, 6) == 0.013299


def test_a_week_that_starts_at_zero_starts_when_its_money_arrives():
    """The opening week (the capital arrives on a Thursday and earns a premium that week)
    counts in full; so does a week in which an emptied account is funded again. The week
    it was emptied on a Monday had no capital at all: no return."""
    ledger = Ledger().add(0, "deposit", BASE, weekday=3).add(0, "premium", 1_000_000, weekday=4)  # 1%
    ledger.add(1, "premium", ledger.balance // 100)                                    # 1%
    ledger.add(2, "withdrawal", ledger.balance)                                        # emptied: no capital
    ledger.add(3, "deposit", BASE, weekday=1).add(3, "premium", BASE // 20, weekday=1)  # 5%
    ledger.add(3, "deposit", BASE, weekday=4)                                          # weight 3/6
    ledger.add(4, "premium", ledger.balance // 50)                                     # 2%
    result = run(ledger)
    assert [r.first_inflow_weekday for r in result.weekly_returns] == [3, None, None, 1, None]
    assert [r.weekly_return for r in result.weekly_returns] == [
        0.01, 0.01, None, BASE // 20 / (BASE + BASE * 3 / 6), 0.02]
    assert result.performance.weeks == 4
    assert result.performance.time_weighted_return == pytest.approx(1.01 * 1.01 * (1 + 1 / 30) * 1.02 - 1,
                                                                    rel=1e-12)
    assert result.performance.income["premium"] == sum(e.amount for e in ledger.entries if e.kind == "premium")


def test_an_account_without_entries_has_empty_figures_and_keeps_its_balance_in_the_forecast():
    result = analytics.account_analytics(account("revenue", 0), [], today=MONDAY)
    assert result.weekly_returns == []
    assert result.performance.weeks == 0 and result.performance.annualized_return is None
    assert result.performance.mean_weekly_return is None and result.performance.meets_target is None
    assert result.trend.label == "flat"
    assert result.forecast.trailing_mean_weekly_return is None
    assert result.forecast.balance == {"4": 0, "13": 0, "52": 0}


def test_weeks_without_entries_up_to_today_are_zero_return_weeks():
    ledger = constant_base([1_000_000, 1_000_000])
    result = run(ledger, today=ledger.day(5, weekday=3))
    assert [r.week_start for r in result.weekly_returns] == [ledger.day(w) for w in range(6)]
    assert returns_of(result) == [0.01, 0.01, 0.0, 0.0, 0.0, 0.0]
    assert all(r.start_balance == r.end_balance == ledger.balance for r in result.weekly_returns[2:])


# -- window --------------------------------------------------------------------------------
def test_the_window_keeps_the_last_n_weeks_for_every_measure():
    nets = [-5_000_000, 3_000_000, 1_000_000, 2_000_000, -1_000_000, 4_000_000]
    ledger = constant_base(nets)
    everything = run(ledger)
    assert everything.performance.weeks == 6
    for weeks in (1, 3, 6):
        result = run(ledger, weeks=weeks)
        shown = [n / BASE for n in nets[-weeks:]]
        assert result.weekly_returns == everything.weekly_returns[-weeks:]
        assert returns_of(result) == shown
        assert result.performance.weeks == weeks
        assert result.performance.time_weighted_return == pytest.approx(math.prod(1 + r for r in shown) - 1)
        assert result.performance.income["net"] == sum(nets[-weeks:])
        assert result.trend.weeks == weeks
        assert result.forecast.trailing_mean_weekly_return == pytest.approx(statistics.fmean(shown))
    # a window wider than the history is all of it (the opening week included)
    assert run(ledger, weeks=520).weekly_returns == everything.weekly_returns
    # the 5% loss of week 1 is outside a 5-week window: no drawdown from it
    assert run(ledger, weeks=5).performance.max_drawdown == pytest.approx(0.01)
    assert everything.performance.max_drawdown == pytest.approx(0.05)


# -- trend ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step_bps, label", [(10, "improving"), (-10, "declining"), (4, "flat"), (-4, "flat"),
                                             (0, "flat"), (6, "improving"), (-6, "declining")])
def test_the_trend_is_the_least_squares_slope_of_the_last_8_weekly_returns(step_bps, label):
    """Returns 1%, 1% + step, 1% + 2 step, ...: the slope is the step."""
    nets = [1_000_000 + i * step_bps * BASE // 10_000 for i in range(8)]
    trend = run(constant_base(nets)).trend
    assert trend.weeks == 8
    assert trend.slope_per_week == pytest.approx(step_bps / 10_000, abs=1e-12)
    assert trend.label == label


def test_only_the_last_8_weekly_returns_make_the_trend():
    falling = [5_000_000 - i * 500_000 for i in range(10)]
    rising = [i * 200_000 for i in range(8)]
    trend = run(constant_base(falling + rising)).trend
    assert (trend.weeks, trend.label) == (8, "improving")
    assert trend.slope_per_week == pytest.approx(0.002, abs=1e-12)
    assert run(constant_base([1_000_000])).trend == analytics.Trend(weeks=1, slope_per_week=0.0, label="flat")


# -- forecast ------------------------------------------------------------------------------
def compounded(balance: int, weekly: Fraction, weeks: int) -> list[int]:
    """Balances after each of `weeks` weeks of round(balance * weekly) (half away from zero)."""
    out = []
    for _ in range(weeks):
        balance += max(round_half_away(balance * weekly), -balance)
        out.append(balance)
    return out


def test_the_forecast_compounds_the_trailing_13_week_mean_week_by_week():
    nets = [9_000_000] * 5 + [1_000_000, 2_000_000, 1_500_000, 500_000] * 3 + [1_234_567]  # last 13: mean known
    ledger = constant_base(nets)
    result = run(ledger)
    weekly = Fraction(sum(nets[-13:]), 13 * BASE)
    assert result.forecast.trailing_mean_weekly_return == float(weekly)
    path = compounded(ledger.balance, weekly, 52)
    assert result.forecast.balance == {"4": path[3], "13": path[12], "52": path[51]}
    assert result.forecast.weeks_to_next_fork is None and result.forecast.weeks_to_merge is None


def test_a_losing_account_is_forecast_to_shrink_never_below_zero():
    ledger = constant_base([-BASE // 5] * 13)  # -20% a week
    result = run(ledger)
    path = compounded(ledger.balance, Fraction(-1, 5), 52)
    assert result.forecast.balance == {"4": path[3], "13": path[12], "52": path[51]}
    assert all(b >= 0 for b in path) and path[3] == round(ledger.balance * 0.8 ** 4)


def test_a_portfolio_gen_acc_is_forecast_to_fork_when_its_surplus_reaches_the_threshold():
    rules = Rules(fork_threshold_cents=10_000_000)  # $100,000 above the baseline
    ledger = constant_base([2_000_000] * 13)       # 2% a week on $1M
    gen = account("generation", BASE, portfolio_id="prt_1", baseline=BASE)
    result = analytics.account_analytics(gen, ledger.entries, today=ledger.last_day, rules=rules)
    # 1.02^4 = 1.0824 < 1.1 <= 1.02^5: the fifth week's premium forks the whole surplus
    path = compounded(BASE, Fraction(2, 100), 5)
    assert path[3] - BASE < 10_000_000 <= path[4] - BASE
    assert result.forecast.weeks_to_next_fork == 5
    # after the fork the Gen-Acc is back at its baseline and grows again from there
    assert BASE <= result.forecast.balance["13"] < BASE + 10_000_000
    standalone = analytics.account_analytics(account("generation", BASE), ledger.entries, today=ledger.last_day,
                                             rules=rules)
    assert standalone.forecast.weeks_to_next_fork is None  # standalone accounts never fork
    assert standalone.forecast.balance["52"] == compounded(BASE, Fraction(2, 100), 52)[-1]


def test_a_flat_account_forecasts_its_balance_and_no_fork():
    ledger = constant_base([0] * 13)
    gen = account("generation", BASE, portfolio_id="prt_1", baseline=BASE)
    result = analytics.account_analytics(gen, ledger.entries, today=ledger.last_day)
    assert result.forecast.balance == {"4": BASE, "13": BASE, "52": BASE}
    assert result.forecast.weeks_to_next_fork is None


# -- robustness of the figures --------------------------------------------------------------
def test_a_huge_weekly_return_does_not_break_the_annualized_return_or_the_forecast():
    """A week earning a million times its start balance (a 1-cent account booking a $10,000
    premium) is extreme but legal input; the analytics of it must still come back (the HTTP
    route may never answer 500 or 409 for a read)."""
    ledger = Ledger().add(0, "deposit", 1).add(1, "premium", 1_000_000)
    result = run(ledger)
    assert returns_of(result) == [0.0, 1_000_000.0]
    assert result.forecast.balance["4"] >= result.balance


def test_a_doubling_account_forecast_for_52_weeks_stays_within_the_balance_limit():
    """Doubling every week for 52 weeks would take $1,000 past the 10^17-cent balance limit;
    the forecast must not turn that into a refusal."""
    ledger = constant_base([100_000] * 13, base=100_000)  # +100% a week on $1,000
    result = run(ledger)
    assert result.forecast.balance["4"] == ledger.balance * 2 ** 4
    assert result.forecast.balance["52"] >= result.forecast.balance["13"]


# -- portfolios -----------------------------------------------------------------------------
def tree() -> tuple[Portfolio, list[Portfolio], dict[str, Account], dict[str, list[Entry]]]:
    """A root portfolio (Gen, Rev, Com, $1M each) and one forked unit: the Gen-Acc earns
    $300,000 in week 1 and forks $200,000 into a unit (Gen $100,000, Com $100,000);
    week 2 the Rev-Acc transfers $50,000 to the Com-Acc and loses $10,000; week 3 the
    unit earns $20,000 and merges into the root's Com-Acc."""
    root = Portfolio(id="prt_root", name="root", owner="ann", root_id="prt_root", generation_account_id="gen",
                     revenue_account_id="rev", compounding_account_id="com", opened_on=MONDAY, created_at=NOW)
    unit = Portfolio(id="prt_unit", name="unit", owner="ann", parent_id="prt_root", root_id="prt_root", depth=1,
                     status="merged", generation_account_id="ugen", compounding_account_id="ucom",
                     opened_on=MONDAY + timedelta(days=7), created_at=NOW)
    gen, rev, com, ugen, ucom = (Ledger() for _ in range(5))
    for ledger in (gen, rev, com):
        ledger.add(0, "deposit", BASE)
    gen.add(1, "premium", 30_000_000).add(1, "fork", 20_000_000, "debit")
    ugen.add(1, "fork", 10_000_000, "credit")
    ucom.add(1, "fork", 10_000_000, "credit")
    rev.add(2, "transfer", 5_000_000, "debit").add(2, "loss", 1_000_000, weekday=1)
    com.add(2, "transfer", 5_000_000, "credit")
    ugen.add(3, "premium", 2_000_000).add(3, "merge", 12_000_000, "debit")
    ucom.add(3, "merge", 10_000_000, "debit")
    com.add(3, "merge", 22_000_000, "credit")
    ledgers = {"gen": gen, "rev": rev, "com": com, "ugen": ugen, "ucom": ucom}
    types = {"gen": "generation", "rev": "revenue", "com": "compounding", "ugen": "generation",
             "ucom": "compounding"}
    portfolio_of = {"gen": "prt_root", "rev": "prt_root", "com": "prt_root", "ugen": "prt_unit",
                    "ucom": "prt_unit"}
    accounts = {i: account(types[i], ledgers[i].balance, portfolio_id=portfolio_of[i], account_id=i,
                           baseline=BASE if i == "gen" else 0,
                           status="merged" if portfolio_of[i] == "prt_unit" else "active") for i in ledgers}
    return root, [root, unit], accounts, {i: ledgers[i].entries for i in ledgers}


def test_portfolio_returns_are_summed_trades_over_summed_start_balances_with_internal_flows_cancelling():
    root, portfolios, accounts, entries = tree()
    result = analytics.portfolio_analytics(root, portfolios, accounts, entries, today=MONDAY + timedelta(days=21))
    three = 3 * BASE
    assert [r.start_balance for r in result.weekly_returns] == [0, three, three + 30_000_000,
                                                                three + 29_000_000]
    assert [r.net_trade for r in result.weekly_returns] == [0, 30_000_000, -1_000_000, 2_000_000]
    # every move inside the tree has its two legs on one day: they cancel
    assert returns_of(result) == [0.0, 30_000_000 / three, -1_000_000 / (three + 30_000_000),
                                  2_000_000 / (three + 29_000_000)]
    assert [r.flow for r in result.weekly_returns] == [three, 0, 0, 0]
    assert result.balance == three + 31_000_000 == sum(a.balance for a in accounts.values())
    assert result.performance.income == {"premium": 32_000_000, "loss": 1_000_000, "fee": 0, "net": 31_000_000}


def test_portfolio_growth_counts_units_and_the_money_forks_and_merges_moved():
    root, portfolios, accounts, entries = tree()
    result = analytics.portfolio_analytics(root, portfolios, accounts, entries, today=MONDAY + timedelta(days=21))
    assert result.growth == analytics.Growth(units_created=1, units_merged=1, units_active=0,
                                             forked_cents=20_000_000, merged_cents=22_000_000)
    assert {s.account_id: s.balance for s in result.accounts} == {a: accounts[a].balance for a in accounts}
    assert {s.account_id: s.portfolio_id for s in result.accounts}["ugen"] == "prt_unit"


def test_a_units_growth_counts_the_money_its_merged_sub_units_moved():
    """Analytics of a forked unit (not the root): its own sub-unit forked and then merged
    into the root's Com-Acc, which is outside the unit's tree. The merge still moved the
    sub-unit's money: merged_cents counts it, as forked_cents counts the fork."""
    unit = Portfolio(id="prt_unit", name="unit", owner="ann", parent_id="prt_root", root_id="prt_root", depth=1,
                     generation_account_id="ugen", compounding_account_id="ucom", opened_on=MONDAY, created_at=NOW)
    sub = Portfolio(id="prt_sub", name="sub", owner="ann", parent_id="prt_unit", root_id="prt_root", depth=2,
                    status="merged", generation_account_id="sgen", compounding_account_id="scom",
                    opened_on=MONDAY + timedelta(days=7), created_at=NOW)
    ugen, ucom, sgen, scom = (Ledger() for _ in range(4))
    ugen.add(0, "fork", 10_000_000, "credit").add(1, "premium", 6_000_000).add(1, "fork", 6_000_000, "debit")
    ucom.add(0, "fork", 10_000_000, "credit")
    sgen.add(1, "fork", 3_000_000, "credit").add(2, "merge", 3_000_000, "debit")
    scom.add(1, "fork", 3_000_000, "credit").add(2, "premium", 1_000_000).add(2, "merge", 4_000_000, "debit")
    ledgers = {"ugen": ugen, "ucom": ucom, "sgen": sgen, "scom": scom}
    accounts = {i: account("generation" if i.endswith("gen") else "compounding", ledgers[i].balance,
                           portfolio_id="prt_unit" if i[0] == "u" else "prt_sub", account_id=i,
                           status="active" if i[0] == "u" else "merged") for i in ledgers}
    result = analytics.portfolio_analytics(unit, [unit, sub], accounts, {i: l.entries for i, l in ledgers.items()},
                                           today=MONDAY + timedelta(days=14))
    assert (result.growth.units_created, result.growth.units_merged, result.growth.forked_cents) == \
        (1, 1, 6_000_000)
    assert result.growth.merged_cents == 7_000_000, result.growth


def test_portfolio_risk_collects_its_accounts_flags_and_takes_the_worst_score():
    root, portfolios, accounts, entries = tree()
    rev = Ledger().add(0, "deposit", BASE).add(1, "loss", BASE * 12 // 100)  # a 12% loss on the Rev-Acc
    entries = {**entries, "rev": rev.entries}
    accounts = {**accounts, "rev": msgspec.structs.replace(accounts["rev"], balance=rev.balance)}
    result = analytics.portfolio_analytics(root, portfolios, accounts, entries, today=MONDAY + timedelta(days=21))
    summaries = {s.account_id: s for s in result.accounts}
    assert summaries["rev"].flags == ["drawdown_breach"]
    assert summaries["gen"].flags == []
    assert result.risk.flags == ["drawdown_breach"]
    assert result.risk.score == max(s.score for s in result.accounts)
    assert result.risk.concentration == max(a.balance for a in accounts.values()) / result.balance


def test_portfolio_forecast_grows_the_total_at_the_portfolios_trailing_mean():
    root, portfolios, accounts, entries = tree()
    result = analytics.portfolio_analytics(root, portfolios, accounts, entries, today=MONDAY + timedelta(days=21))
    weekly = Fraction(30_000_000, 3 * BASE) + Fraction(-1_000_000, 3 * BASE + 30_000_000) \
        + Fraction(2_000_000, 3 * BASE + 29_000_000)
    weekly /= 4  # the opening week (0%) is one of the four
    path = compounded(result.balance, weekly, 52)
    assert result.forecast.total_value == {"4": path[3], "13": path[12], "52": path[51]}
    assert result.forecast.trailing_mean_weekly_return == float(weekly)


def test_the_legs_of_one_merge_fall_in_the_same_week_so_they_cancel_in_the_portfolio():
    """A unit forked in week 1 (its Gen-Acc has no entry after that) merges in week 2 on a
    credit to its Com-Acc. Every leg of the merge must be dated in one week, or the money
    leaves the tree in one week and comes back in another (the portfolio's start balance
    of the weeks in between misses it)."""
    rules = Rules(fork_threshold_cents=1_000_00, merge_threshold_cents=5_000_00)
    counter = iter(range(1, 10_000))

    def new_id(prefix: str) -> str:
        return f"{prefix}_{next(counter):06d}"

    now = NOW + timedelta(days=30)
    book = Book()
    book.apply(open_portfolio(name="p", owner="ann", capital=10_000_00, now=NOW, new_id=new_id, opened_on=MONDAY,
                              rules=rules))
    root = next(iter(book.portfolios.values()))
    book.apply(decide(book.accounts[root.generation_account_id],
                      BookTrade(kind="premium", amount=1_000_00, effective_date=MONDAY + timedelta(days=7)),
                      transaction_id=new_id("txn"), now=now, rules=rules, new_id=new_id))
    unit = next(p for p in book.portfolios.values() if p.is_unit)
    book.apply(decide(book.accounts[unit.compounding_account_id],
                      BookTrade(kind="premium", amount=4_000_00, effective_date=MONDAY + timedelta(days=14)),
                      transaction_id=new_id("txn"), now=now, rules=rules, new_id=new_id))
    assert merge_due(unit, [book.accounts[i].balance for i in unit.account_ids], rules)
    events: list = []
    # As the engine and the projection do: one date for every leg of the merge.
    when = merge_date([book.accounts[i] for i in (*unit.account_ids, root.compounding_account_id)])
    for account_id, command in merge_steps(unit, root.compounding_account_id, when):
        events += decide(book.accounts[account_id], command or merge_in(unit, events, when),
                         transaction_id=new_id("txn"), now=now, rules=rules, new_id=new_id)
    legs = {e.leg.account_id: e.leg.effective_date for e in events if isinstance(e, LegPosted)}
    assert set(legs) == {unit.generation_account_id, unit.compounding_account_id, root.compounding_account_id}
    assert len({analytics.week_of(day) for day in legs.values()}) == 1, legs


# -- hypothesis ------------------------------------------------------------------------------
KINDS = ("deposit", "withdrawal", "premium", "loss", "fee", "transfer_in", "transfer_out", "fork_out", "merge_in")
NAMES = {"transfer_in": ("transfer", "credit"), "transfer_out": ("transfer", "debit"), "fork_out": ("fork", "debit"),
         "merge_in": ("merge", "credit")}
PREMIUM_MAX_RATIO = 5  # an ordinary week earns at most 5x its start balance


@st.composite
def ledgers(draw, weeks_max: int = 20, ordinary: bool = True) -> Ledger:
    """A random account history: an opening deposit, then random entries (trades and flows)
    in date order over up to `weeks_max` weeks, never below zero. An `ordinary` ledger
    keeps every week's net trade between -1 and +5 times the week's start balance (no
    week loses more than it started with); otherwise amounts are anything up to 10^12."""
    ledger = Ledger().add(0, "deposit", draw(st.integers(1, 10**12)))
    steps = draw(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(KINDS), st.integers(1, 10**12)),
                          max_size=40))
    week, weekday, start, net = 0, 0, 0, 0
    for gap, kind, amount in steps:
        if gap and week < weeks_max:
            week, weekday = min(week + gap, weeks_max), draw(st.integers(0, 6))
            start, net = ledger.balance, 0
        if kind in ("withdrawal", "loss", "fee", "transfer_out", "fork_out"):
            amount = min(amount, ledger.balance)
        if ordinary and kind == "premium":
            amount = min(amount, PREMIUM_MAX_RATIO * start - net)
        if ordinary and kind in ("loss", "fee"):
            amount = min(amount, start + net)
        if amount <= 0:
            continue
        if kind in ("premium", "loss", "fee"):
            net += amount if kind == "premium" else -amount
        name, direction = NAMES.get(kind, (kind, None))
        ledger.add(week, name, amount, direction, weekday=weekday)
    return ledger


def figures(entries: list[Entry], today: date, account_type: str = "revenue", *, weeks: int | None = None,
            concentration: float | None = None) -> tuple:
    """Weekly rows, performance, risk and trend, as account_analytics computes them."""
    rows = analytics.window(analytics.weekly_series(entries, today), weeks)
    perf = analytics.performance(rows, weekly_target=TARGET[account_type])
    return (rows, perf, analytics.risk(perf, drawdown_limit=LIMIT[account_type], concentration=concentration),
            analytics.trend(rows))


def scaled(entries: list[Entry], k: int) -> list[Entry]:
    return [Entry(e.effective_date, e.kind, e.direction, e.amount * k, e.balance_after * k) for e in entries]


@settings(max_examples=200, deadline=None)
@given(ledger=ledgers(), k=st.integers(2, 10**4), extra_weeks=st.integers(0, 4))
def test_returns_are_invariant_to_the_scale_of_the_money(ledger, k, extra_weeks):
    today = ledger.last_day + timedelta(days=7 * extra_weeks)
    one_rows, one, one_risk, one_trend = figures(ledger.entries, today)
    many_rows, many, many_risk, many_trend = figures(scaled(ledger.entries, k), today)
    assert [r.weekly_return for r in one_rows] == [r.weekly_return for r in many_rows]
    for field in ("weeks", "time_weighted_return", "annualized_return", "volatility", "sharpe", "max_drawdown",
                  "current_drawdown", "mean_weekly_return", "meets_target"):
        assert getattr(one, field) == getattr(many, field), field
    assert {key: value * k for key, value in one.income.items()} == many.income
    assert one_trend == many_trend
    assert one_risk == many_risk


@settings(max_examples=200, deadline=None)
@given(ledger=ledgers(ordinary=False), extra_weeks=st.integers(0, 4))
def test_every_weekly_return_is_the_weeks_modified_dietz_return(ledger, extra_weeks):
    today = ledger.last_day + timedelta(days=7 * extra_weeks)
    rows = analytics.weekly_series(ledger.entries, today)
    first = analytics.week_of(ledger.entries[0].effective_date)
    assert [r.week_start for r in rows] == [first + timedelta(days=7 * i) for i in range(len(rows))]
    assert rows[-1].week_start == analytics.week_of(today)
    sign = {"premium": 1, "loss": -1, "fee": -1}
    for row in rows:
        before = [e for e in ledger.entries if e.effective_date < row.week_start]
        inside = [e for e in ledger.entries if row.week_start <= e.effective_date < row.week_start + timedelta(7)]
        start = before[-1].balance_after if before else 0
        net = sum(sign.get(e.kind, 0) * e.amount for e in inside)
        assert row.start_balance == start
        assert row.net_trade == net
        assert (row.premium, row.loss, row.fee) == tuple(sum(e.amount for e in inside if e.kind == kind)
                                                         for kind in ("premium", "loss", "fee"))
        assert row.end_balance == (inside[-1].balance_after if inside else start)
        assert row.end_balance == row.start_balance + row.flow + row.net_trade
        exact = dietz_reference(ledger.entries, row.week_start)
        assert row.weekly_return == (None if exact is None else float(exact))


def with_flows(percents: list[int], flows: list[tuple[int, int]], start: int) -> Ledger:
    """A ledger earning exactly percents[w-1] % in week w whatever the flows: each week
    starts with flows on its Monday (weight 1: they are the week's capital) - an optional
    deposit, an optional withdrawal or transfer out of part of the balance, a deposit of
    at most 99 cents so that the capital is a whole multiple of 100 cents - then the trade
    on percent % of it (a premium, or a loss and a fee together)."""
    ledger = Ledger().add(0, "deposit", start * 100)
    for week, (percent, (deposit, out)) in enumerate(zip(percents, flows), start=1):
        if deposit:
            ledger.add(week, "deposit", deposit * 100)
        if out and ledger.balance * out // 100:
            ledger.add(week, "transfer" if out % 2 else "withdrawal", ledger.balance * out // 100, "debit")
        if ledger.balance % 100:
            ledger.add(week, "deposit", 100 - ledger.balance % 100)
        capital = ledger.balance
        net = capital // 100 * percent
        if net > 0:
            ledger.add(week, "premium", net, weekday=1)
        elif net < 0:
            fee = min(-net, capital // 1000 + 1)
            if -net - fee:
                ledger.add(week, "loss", -net - fee, weekday=1)
            ledger.add(week, "fee", fee, weekday=2)
    return ledger


@settings(max_examples=200, deadline=None)
@given(percents=st.lists(st.integers(-99, 100), min_size=1, max_size=30), data=st.data(),
       start=st.integers(1, 10**6))
def test_returns_are_invariant_to_flows(percents, data, start):
    """The same weekly returns (whole percents, never a total loss) with random deposits,
    withdrawals and transfers, and with none: the same weekly returns, TWR, annualized
    return, volatility, drawdowns and trend."""
    flows = data.draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 99)), min_size=len(percents),
                               max_size=len(percents)))
    quiet = with_flows(percents, [(0, 0)] * len(percents), start)
    busy = with_flows(percents, flows, start)
    today = quiet.day(len(percents))
    quiet_rows, a, _, a_trend = figures(quiet.entries, today)
    busy_rows, b, _, b_trend = figures(busy.entries, today)
    assert [r.weekly_return for r in quiet_rows] == [0.0] + [p / 100 for p in percents]
    assert [r.weekly_return for r in busy_rows] == [r.weekly_return for r in quiet_rows]
    for field in ("weeks", "time_weighted_return", "annualized_return", "volatility", "sharpe", "max_drawdown",
                  "current_drawdown", "mean_weekly_return"):
        assert getattr(a, field) == getattr(b, field), field
    assert a_trend == b_trend


def test_a_loss_beyond_the_weeks_average_capital_is_at_most_a_total_loss():
    """A week can lose more than its average capital when money arrived late in it ($100
    at the start, $7,000 deposited on Sunday - weight 1/7 - and $3,000 lost that day:
    r = -3,000 / 1,100 = -273%). The drawdown is still at most 1, and two such weeks do
    not add up to a gain."""
    ledger = Ledger().add(0, "deposit", 100_00)
    ledger.add(1, "deposit", 7_000_00, weekday=6).add(1, "loss", 3_000_00, weekday=6)
    ledger.add(2, "deposit", 7_000_00, weekday=6).add(2, "loss", 8_000_00, weekday=6)
    rows, perf, _, _ = figures(ledger.entries, ledger.last_day)
    assert [r.weekly_return for r in rows] == [0.0, -3_000_00 / 1_100_00, -8_000_00 / 5_100_00]
    assert 0.0 <= perf.current_drawdown <= perf.max_drawdown <= 1.0, (perf.current_drawdown, perf.max_drawdown)
    assert perf.time_weighted_return < 0, perf.time_weighted_return


@settings(max_examples=300, deadline=None)
@given(returns=st.lists(st.floats(-1.0, 100.0, allow_nan=False), max_size=60))
def test_drawdowns_of_returns_of_at_least_minus_100_percent_are_between_0_and_1(returns):
    worst, current = analytics.drawdowns(returns)
    assert 0.0 <= current <= worst <= 1.0


@settings(max_examples=300, deadline=None)
@given(ledger=ledgers(ordinary=False), weeks=st.one_of(st.none(), st.integers(1, 520)))
def test_the_drawdown_of_any_ledger_is_between_0_and_1(ledger, weeks):
    rows = analytics.window(analytics.weekly_series(ledger.entries, ledger.last_day), weeks)
    worst, current = analytics.drawdowns([r.weekly_return for r in rows if r.weekly_return is not None])
    assert 0.0 <= current <= worst <= 1.0
    assert 0.0 <= analytics.current_drawdown(ledger.entries, ledger.last_day) <= 1.0


def test_a_loss_of_exactly_the_limit_sets_the_flag():
    """30 -> 27 is a 10% drawdown, which computes as 0.09999999999999998: a Rev-Acc's
    10% limit is reached (the case hypothesis found against an exact comparison)."""
    entries = [Entry(date(2025, 1, 6), "deposit", "credit", 30, 30), Entry(date(2025, 1, 13), "loss", "debit", 3, 27)]
    _, perf, risk, _ = figures(entries, date(2025, 1, 13), "revenue")
    assert perf.current_drawdown < 0.1 and perf.current_drawdown == pytest.approx(0.1)
    assert risk.flags == ["drawdown_breach"]
    _, _, risk, _ = figures(entries, date(2025, 1, 13), "generation")   # a Gen-Acc's limit is higher
    assert risk.flags == []


@settings(max_examples=200, deadline=None)
@given(ledger=ledgers(), weeks=st.one_of(st.none(), st.integers(1, 520)), share=st.integers(1, 100))
def test_the_risk_score_and_flag_of_any_ordinary_ledger_follow_the_drawdown(ledger, weeks, share):
    for account_type in ("generation", "revenue", "compounding"):
        _, perf, risk, _ = figures(ledger.entries, ledger.last_day, account_type, weeks=weeks,
                                   concentration=share / 100)
        assert 0.0 <= perf.current_drawdown <= perf.max_drawdown <= 1.0
        assert 0 <= risk.score <= 100
        # Reached, up to float noise: a loss of exactly 10% computes as 0.09999999999999998
        # (hypothesis found 30 -> 27), which the flag counts as 10% (docs/analytics.md).
        reached = perf.current_drawdown >= LIMIT[account_type] - 1e-9
        assert (risk.flags == ["drawdown_breach"]) == reached
        if reached:
            assert risk.score >= 60


def projection_ledger(capital: int, rate_bps: int, weeks: int) -> tuple[Ledger, list[int], Fraction]:
    """The projected Rev-Acc of a root portfolio earning `rate_bps` a week (on its
    deployable 95%), as a ledger of `weeks` weekly premiums, and the projected Rev-Acc
    balances of every week after (index 0 = week `weeks` + 1)."""
    run_weeks = weeks + 52
    projected = project(initial_capital=capital, weeks=run_weeks,
                        weekly_return_bps={"generation": 0, "revenue": rate_bps, "compounding": 0}, start=MONDAY)
    revenue = [capital_split(capital)["revenue"]] + [w.revenue for w in projected.weeks]
    ledger = Ledger().add(0, "deposit", revenue[0])
    for week in range(1, weeks + 1):
        ledger.add(week, "premium", revenue[week] - revenue[week - 1])
    rate = Fraction(rate_bps * (10_000 - DEFAULT_RULES.cash_buffer_bps["revenue"]), 10**8)
    return ledger, revenue[weeks + 1:], rate


@settings(max_examples=100, deadline=None)
@given(capital=st.integers(10**7, 10**12), rate_bps=st.integers(1, 300), weeks=st.integers(13, 40))
def test_the_forecast_of_a_constant_return_account_matches_the_projection(capital, rate_bps, weeks):
    """A Rev-Acc that earned the projection's constant rate (its premiums rounded to the
    cent) is forecast like the projection continues, to within the rounding: the trailing
    mean differs from the rate by at most half a cent over the smallest start balance, and
    each week's rounding adds at most a cent."""
    ledger, later, rate = projection_ledger(capital, rate_bps, weeks)
    result = run(ledger, "revenue")
    rows = result.weekly_returns
    mean = analytics.trailing_mean(rows)
    smallest = min(r.start_balance for r in rows[-13:])
    assert abs(mean - rate) <= Fraction(1, 2 * smallest)
    epsilon = abs(mean - rate)
    for horizon in (4, 13, 52):
        forecast, projected = result.forecast.balance[str(horizon)], later[horizon - 1]
        bound = sum((1 + rate) ** (horizon - 1 - j) * (1 + later[j] * 2 * epsilon) for j in range(horizon))
        assert abs(forecast - projected) <= bound, (horizon, forecast, projected, float(bound))


def test_the_forecast_of_the_projections_gen_acc_forks_when_the_projection_does():
    """The projection's Gen-Acc (1.5% a week) forks for the first time in week F (its $80,000
    need $50,000 of surplus); fed its first 13 weeks, the forecast finds the fork F - 13
    weeks ahead."""
    capital = 200_000_00
    projected = project(initial_capital=capital, weeks=200,
                        weekly_return_bps={"generation": 150, "revenue": 0, "compounding": 0}, start=MONDAY)
    first_fork = next(w.week for w in projected.weeks if w.forks)
    assert first_fork > 13
    opening = capital_split(capital)["generation"]
    generation = [opening] + [w.generation for w in projected.weeks[:13]]
    ledger = Ledger().add(0, "deposit", opening)
    for week in range(1, 14):
        ledger.add(week, "premium", generation[week] - generation[week - 1])
    gen = account("generation", ledger.balance, portfolio_id="prt_1", baseline=opening)
    result = analytics.account_analytics(gen, ledger.entries, today=ledger.last_day)
    assert result.forecast.weeks_to_next_fork == first_fork - 13
