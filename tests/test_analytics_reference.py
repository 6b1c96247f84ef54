"""Our analytics against the reference library on the same weekly returns (issue 15):
empyrical-reloaded for time-weighted and annualized return, volatility, Sharpe, Sortino,
Calmar, maximum drawdown, VaR and CVaR; scipy.stats (as empyrical's statistics table)
for skew and kurtosis; QuantStats' win rate and pyfolio's drawdown periods on
empyrical's drawdown series (`tests/analytics_reference.py`). Fixed series - flat,
all-loss, single-week, zero-volatility, total loss and ordinary ones - and
hypothesis-generated ones, booked as ledgers and read back through the Modified Dietz
weekly series, for accounts and for portfolios."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from analytics_reference import assert_matches_reference, reference
from engine import analytics
from engine.analytics import Entry
from engine.model import Account, Portfolio

MONDAY = date(2025, 1, 6)
NOW = datetime(2025, 1, 6, 12, tzinfo=timezone.utc)
CAPITAL = 100_000_000  # $1,000,000: a basis point of it is a whole number of cents
CREDIT = {"deposit": "credit", "premium": "credit", "withdrawal": "debit", "loss": "debit", "fee": "debit"}


def ledger_of(returns_bps: list[int], capital: int = CAPITAL, start: date = MONDAY) -> list[Entry]:
    """A ledger whose week k earns returns_bps[k] basis points of `capital`: the opening
    deposit on Monday of week 0, each week's trade on Wednesday, and on the next Monday a
    flow back to `capital` (Modified Dietz weighs a Monday flow in full, so each week's
    average capital is exactly `capital`)."""
    entries: list[Entry] = []
    balance = 0

    def add(day: date, kind: str, amount: int) -> None:
        nonlocal balance
        balance += amount if CREDIT[kind] == "credit" else -amount
        entries.append(Entry(day, kind, CREDIT[kind], amount, balance))

    for week, bps in enumerate(returns_bps):
        monday = start + timedelta(weeks=week)
        if balance != capital:
            add(monday, "deposit" if balance < capital else "withdrawal", abs(capital - balance))
        net = capital * bps // 10_000
        if net:
            add(monday + timedelta(days=2), "premium" if net > 0 else "loss", abs(net))
    return entries


def account(balance: int, account_type: str = "revenue", account_id: str = "acc_1",
            portfolio_id: str | None = None) -> Account:
    return Account(id=account_id, name=account_type, type=account_type, owner="ann", balance=balance,
                   portfolio_id=portfolio_id, root_portfolio_id=portfolio_id, opened_on=MONDAY, created_at=NOW,
                   updated_at=NOW)


def analysed(returns_bps: list[int], **kwargs) -> analytics.AccountAnalytics:
    entries = ledger_of(returns_bps)
    today = MONDAY + timedelta(weeks=len(returns_bps) - 1)
    return analytics.account_analytics(account(entries[-1].balance_after), entries, today=today, **kwargs)


def returns_of(result) -> list[float]:
    return [row.weekly_return for row in result.weekly_returns if row.weekly_return is not None]


SERIES = {
    "ordinary": [120, -340, 80, 150, -500, 210, 60, -90, 300, -30, 0, 45, -120, 95],
    "flat": [0] * 10,
    "all-loss": [-100, -250, -50, -400, -10, -75],
    "single-week": [150],
    "zero-volatility": [100] * 8,
    "total-loss": [100, 50, -10_000, 200, 0],
    "all-wins": [10, 20, 30, 5, 15],
    "two-weeks": [-200, 300],
    "recovered-drawdown": [100, -300, 150, 200, -50, 400],
}
RATES = [(0.0, 0.0), (0.04, 0.02), (-0.01, 0.10)]


@pytest.mark.parametrize("risk_free_rate, required_return", RATES)
@pytest.mark.parametrize("name", SERIES)
def test_every_shared_measure_of_a_fixed_series_matches_empyrical(name, risk_free_rate, required_return):
    result = analysed(SERIES[name], risk_free_rate=risk_free_rate, required_return=required_return)
    returns = returns_of(result)
    assert returns == [bps / 10_000 for bps in SERIES[name]]
    assert_matches_reference(result.performance, returns, risk_free_rate, required_return)


def test_the_edge_cases_are_documented_nulls():
    """Where the library answers NaN or infinity, we answer null: no Sharpe, Sortino,
    skew or kurtosis for one week or for identical weeks, no Calmar without a drawdown,
    no Sortino without a week below the required return, no win rate without a week
    that won or lost, no time to recovery while the deepest drawdown lasts."""
    single = analysed(SERIES["single-week"]).performance
    assert (single.sharpe, single.sortino, single.skew, single.kurtosis, single.calmar) == (None,) * 5
    assert single.volatility == 0.0 and single.value_at_risk_95 == 0.015 and single.win_rate == 1.0
    constant = analysed(SERIES["zero-volatility"]).performance
    assert (constant.sharpe, constant.sortino, constant.skew, constant.kurtosis, constant.calmar) == (None,) * 5
    flat = analysed(SERIES["flat"]).performance
    assert (flat.win_rate, flat.sharpe, flat.calmar, flat.best_week) == (None, None, None, 0.0)
    assert (flat.max_drawdown_duration_weeks, flat.time_to_recovery_weeks) == (0, 0)
    losing = analysed(SERIES["all-loss"]).performance
    assert losing.win_rate == 0.0 and losing.time_to_recovery_weeks is None
    assert losing.max_drawdown_duration_weeks == len(SERIES["all-loss"])
    assert losing.calmar == pytest.approx(losing.annualized_return / losing.max_drawdown)
    ruined = analysed(SERIES["total-loss"]).performance
    assert (ruined.time_weighted_return, ruined.annualized_return, ruined.max_drawdown) == (-1.0, -1.0, 1.0)
    assert ruined.calmar == -1.0 and ruined.time_to_recovery_weeks is None
    recovered = analysed(SERIES["recovered-drawdown"]).performance
    # peak after week 1, valley at week 2, back above the peak in week 4: 3 weeks, 2 to recover
    assert (recovered.max_drawdown_duration_weeks, recovered.time_to_recovery_weeks) == (3, 2)


def test_the_same_name_gives_the_same_number_sharpe_is_not_return_over_volatility():
    """The issue's complaint: our old 'Sharpe' was (annualized - risk-free) / volatility.
    Sharpe is now empyrical's; the old ratio is still there under its own name."""
    performance = analysed(SERIES["ordinary"], risk_free_rate=0.03).performance
    theirs = reference(returns_of(analysed(SERIES["ordinary"])), risk_free_rate=0.03)
    assert performance.sharpe == pytest.approx(theirs["sharpe"], rel=1e-12)
    assert performance.return_over_volatility == pytest.approx(
        (performance.annualized_return - 0.03) / performance.volatility, rel=1e-12)
    assert performance.return_over_volatility != pytest.approx(performance.sharpe, rel=0.1)


@settings(max_examples=150, deadline=None)
@given(returns_bps=st.lists(st.integers(-9_999, 20_000), min_size=1, max_size=60),
       rates=st.sampled_from(RATES))
def test_every_shared_measure_of_any_series_matches_empyrical(returns_bps, rates):
    result = analysed(returns_bps, risk_free_rate=rates[0], required_return=rates[1])
    returns = returns_of(result)
    assert returns == [bps / 10_000 for bps in returns_bps]
    assert_matches_reference(result.performance, returns, *rates)


@settings(max_examples=100, deadline=None)
@given(returns_bps=st.lists(st.sampled_from([-500, -100, 0, 0, 100, 250]), min_size=1, max_size=40))
def test_series_with_many_ties_match_empyrical(returns_bps):
    """Repeated and zero weeks: equal values (constant excess, flat weeks, equal troughs)
    are where the conventions for ties and zero dispersion show."""
    result = analysed(returns_bps)
    assert_matches_reference(result.performance, returns_of(result))


@st.composite
def busy_ledgers(draw) -> tuple[list[Entry], date]:
    """Random weeks with random deposits and withdrawals on random days around a trade:
    Modified Dietz weighs them, and whatever weekly returns come out, the measures of
    those returns must be the library's."""
    entries: list[Entry] = []
    balance = 0
    weeks = draw(st.integers(1, 30))
    for week in range(weeks):
        for _ in range(draw(st.integers(0 if week else 1, 3))):
            day = MONDAY + timedelta(weeks=week, days=draw(st.integers(0, 6)))
            if entries and day < entries[-1].effective_date:
                day = entries[-1].effective_date
            kind = draw(st.sampled_from(["deposit", "withdrawal", "premium", "loss", "fee"]))
            amount = draw(st.integers(1, 10**9))
            if balance == 0:
                kind = "deposit"
            elif kind in ("withdrawal", "loss", "fee"):
                amount = min(amount, balance // 3)  # ordinary weeks: never down to nothing
            if amount <= 0:
                continue
            balance += amount if CREDIT[kind] == "credit" else -amount
            entries.append(Entry(day, kind, CREDIT[kind], amount, balance))
    return entries, MONDAY + timedelta(weeks=weeks - 1)


@settings(max_examples=150, deadline=None)
@given(ledger=busy_ledgers())
def test_the_measures_of_ledgers_with_flows_on_any_day_match_empyrical(ledger):
    entries, today = ledger
    result = analytics.account_analytics(account(entries[-1].balance_after), entries, today=today)
    returns = returns_of(result)
    assume(returns and all(r > -1 for r in returns))  # the index is floored at 0 below -100%
    assert_matches_reference(result.performance, returns)


def test_portfolio_analytics_match_empyrical_on_the_portfolios_weekly_returns():
    """A root portfolio of three accounts with different weeks: its measures are the
    library's on its own (combined Modified Dietz) weekly returns."""
    root = Portfolio(id="prt_root", name="root", owner="ann", root_id="prt_root", generation_account_id="gen",
                     revenue_account_id="rev", compounding_account_id="com", opened_on=MONDAY, created_at=NOW)
    series = {"gen": [150, -400, 250, 100, -50, 300], "rev": [100, -200, 50, 120, -300, 80],
              "com": [50, 20, -100, 60, 40, -20]}
    types = {"gen": "generation", "rev": "revenue", "com": "compounding"}
    entries = {i: ledger_of(s) for i, s in series.items()}
    accounts = {i: account(entries[i][-1].balance_after, types[i], i, "prt_root") for i in series}
    result = analytics.portfolio_analytics(root, [root], accounts, entries, today=MONDAY + timedelta(weeks=5),
                                           risk_free_rate=0.04, required_return=0.02)
    returns = returns_of(result)
    assert returns == pytest.approx([sum(s[w] for s in series.values()) / 30_000 for w in range(6)], rel=1e-12)
    assert_matches_reference(result.performance, returns, 0.04, 0.02)
