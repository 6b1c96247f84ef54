"""Account and portfolio analytics: pure functions over ledger entries (SPEC section 3).

Weeks are ISO weeks (Monday to Sunday) of the entries' effective dates. For week w, the
Modified Dietz return
    r_w = N_w / (B_w + sum_i F_i * W_i)
where N_w is the net trade result (premiums - losses - fees booked to that week), B_w
the balance at the start of the week (after the last entry dated before it), F_i each
external flow of the week (deposits, withdrawals, transfers, fork and merge legs, the
opening allocation; signed) and W_i the share of the week it was in (or out of) the
account: a flow on weekday d (Monday = 0) counts from the start of that day, W_i =
(7 - d) / 7 - the same weight in and out, so the two legs of a move inside a portfolio
cancel. A week that starts at zero (the opening week, say) starts on the day its first
money arrives, d0: W_i = (7 - d) / (7 - d0). Flows never count as return; a week whose
average capital (the denominator) is not positive has no return. Effective dates never
go backwards on an account, so entries in ledger order are in date order too.

From the weekly returns of the window (the last `weeks` weeks, default all):
- time-weighted return TWR = prod(1 + r_w) - 1; annualized = (1 + TWR)^(52/n) - 1;
- volatility = sample stdev(r_w) * sqrt(52) (0 with fewer than two weeks);
- Sharpe, Sortino, Calmar, VaR, CVaR, win rate, skew, kurtosis, drawdown durations: in
  the reference libraries' conventions (`engine.measures`); return over volatility =
  (annualized - risk-free rate) / volatility (None when volatility is 0);
- return index I_0 = 1, I_w = I_{w-1} * (1 + r_w); max drawdown = max over w of
  (peak_w - I_w) / peak_w; current drawdown = (peak - I_n) / peak;
- risk: `drawdown_breach` when the current drawdown reaches the type's limit (15% / 10% /
  7%); concentration = the account's share of its portfolio's balance; the risk score
  (0 = calm, 100 = at or beyond every limit) = round(60 * min(1, drawdown / limit)
  + 25 * min(1, volatility / (2 * weekly target * sqrt(52))) + 15 * concentration);
- trend: least-squares slope of the last 8 weekly returns; `improving` above +0.0005
  per week, `declining` below -0.0005, else `flat`;
- forecast: the trailing mean weekly return m of the last 13 weeks, applied week by week
  with the projection's own functions (a premium or loss of round(balance * m) booked
  through `decide`, so a Gen-Acc forks when it would): balances at 4, 13 and 52 weeks,
  weeks to the next fork (a portfolio's Gen-Acc) or merge (a forked unit), up to 520.
"""
from __future__ import annotations

import math
import statistics
from datetime import date, datetime, time, timedelta, timezone
from fractions import Fraction

from msgspec import Struct

from engine import limits, measures
from engine.growth import merge_due
from engine.model import Account, BookTrade, Portfolio
from engine.rules import DEFAULT_RULES, Rules, decide, mutate_all

TREND_WEEKS = 8
TREND_FLAT_SLOPE = 0.0005
FORECAST_TRAILING_WEEKS = 13
FORECAST_HORIZONS = (4, 13, 52)
FORECAST_WEEKS_MAX = 520
TRADE_SIGNS = {"premium": 1, "loss": -1, "fee": -1}
TRADE_COLUMNS = {"premium": 0, "loss": 1, "fee": 2}
DRAWDOWN_TOLERANCE = 1e-9
DAYS_PER_WEEK = 7


class Entry(Struct, frozen=True, array_like=True):
    """The part of a ledger entry analytics reads, in ledger order."""

    effective_date: date
    kind: str
    direction: str
    amount: int
    balance_after: int


class WeekReturn(Struct, frozen=True, kw_only=True):
    week_start: date
    start_balance: int
    net_trade: int
    premium: int
    loss: int
    fee: int
    end_balance: int
    weekly_return: float | None
    # Modified Dietz (docs/analytics.md): the week's net external flow; each flow times
    # the days from the start of its day to the week's end (cent-days, signed); the
    # weekday (Monday = 0) money first arrived (null without an inflow); the average
    # capital start_balance + flow_cent_days / period days, the return's denominator.
    flow: int
    flow_cent_days: int
    first_inflow_weekday: int | None
    average_capital: float


class Performance(Struct, frozen=True, kw_only=True):
    weeks: int
    time_weighted_return: float
    annualized_return: float | None
    volatility: float
    sharpe: float | None
    max_drawdown: float
    current_drawdown: float
    mean_weekly_return: float | None
    target_weekly_return: float
    meets_target: bool | None
    income: dict[str, int]
    # Each in the reference libraries' convention (docs/analytics.md lists them).
    return_over_volatility: float | None
    sortino: float | None
    calmar: float | None
    value_at_risk_95: float | None
    conditional_value_at_risk_95: float | None
    best_week: float | None
    worst_week: float | None
    win_rate: float | None
    max_drawdown_duration_weeks: int
    time_to_recovery_weeks: int | None
    skew: float | None
    kurtosis: float | None
    risk_free_rate: float
    required_return: float


class Risk(Struct, frozen=True, kw_only=True):
    drawdown: float
    drawdown_limit: float
    flags: list[str]
    concentration: float | None
    score: int


class Trend(Struct, frozen=True, kw_only=True):
    weeks: int
    slope_per_week: float
    label: str


class Forecast(Struct, frozen=True, kw_only=True):
    trailing_mean_weekly_return: float | None
    balance: dict[str, int]
    weeks_to_next_fork: int | None = None
    weeks_to_merge: int | None = None


class AccountAnalytics(Struct, frozen=True, kw_only=True):
    account_id: str
    type: str
    balance: int
    weekly_returns: list[WeekReturn]
    performance: Performance
    risk: Risk
    trend: Trend
    forecast: Forecast


def week_of(day: date) -> date:
    return day - timedelta(days=day.weekday())


class WeekTotals(Struct, frozen=True, array_like=True):
    """One account's ledger summed over one ISO week (what the database returns). The
    flow fields are those of `WeekReturn`."""

    week_start: date
    premium: int
    loss: int
    fee: int
    end_balance: int
    flow: int = 0
    flow_cent_days: int = 0
    first_inflow_weekday: int | None = None


def flow_cent_days(entry: Entry) -> int:
    """A flow (signed) times the days from the start of its day to the week's end."""
    days = DAYS_PER_WEEK - entry.effective_date.weekday()
    return entry.amount * days if entry.direction == "credit" else -entry.amount * days


def week_totals(entries: list[Entry]) -> list[WeekTotals]:
    """Entries (in ledger order) summed per ISO week of their effective dates."""
    aggregates: dict[date, list] = {}
    for entry in entries:
        week = aggregates.setdefault(week_of(entry.effective_date), [0, 0, 0, 0, 0, 0, None])
        if entry.kind in TRADE_SIGNS:
            week[TRADE_COLUMNS[entry.kind]] += entry.amount
        else:
            week[4] += entry.amount if entry.direction == "credit" else -entry.amount
            week[5] += flow_cent_days(entry)
            if entry.direction == "credit" and week[6] is None:
                week[6] = entry.effective_date.weekday()
        week[3] = entry.balance_after
    return [WeekTotals(week, *values) for week, values in aggregates.items()]


def dietz(start: int, net: int, cent_days: int, first_inflow_weekday: int | None) -> tuple[int, int, int]:
    """(numerator, denominator, period days) of the week's Modified Dietz return, in
    integers: r = N * T / (B * T + flow cent-days), T = 7, or the days from the first
    inflow to the week's end when the week starts at zero. The return exists when the
    denominator is positive."""
    days = DAYS_PER_WEEK if start > 0 or first_inflow_weekday is None else DAYS_PER_WEEK - first_inflow_weekday
    return net * days, start * days + cent_days, days


def week_return(week: date, start: int, premium: int, loss: int, fee: int, end: int, flow: int, cent_days: int,
                first_inflow_weekday: int | None) -> WeekReturn:
    net = premium - loss - fee
    numerator, denominator, days = dietz(start, net, cent_days, first_inflow_weekday)
    return WeekReturn(week_start=week, start_balance=start, net_trade=net, premium=premium, loss=loss, fee=fee,
                      end_balance=end, weekly_return=numerator / denominator if denominator > 0 else None,
                      flow=flow, flow_cent_days=cent_days, first_inflow_weekday=first_inflow_weekday,
                      average_capital=denominator / days)


def weekly_series(ledger: list[Entry] | list[WeekTotals], today: date) -> list[WeekReturn]:
    """One row per ISO week from the first entry's week to `today`'s (weeks without
    entries included), with the balance carried from week to week. Takes entries or
    weekly totals (the same sums, computed by the database)."""
    if not ledger:
        return []
    totals = ledger if isinstance(ledger[0], WeekTotals) else week_totals(ledger)
    by_week = {t.week_start: t for t in totals}
    rows: list[WeekReturn] = []
    week, last, balance = min(by_week), max(week_of(today), max(by_week)), 0
    while week <= last:
        found = by_week.get(week)
        if found is None:
            rows.append(week_return(week, balance, 0, 0, 0, balance, 0, 0, None))
        else:
            rows.append(week_return(week, balance, found.premium, found.loss, found.fee, found.end_balance,
                                    found.flow, found.flow_cent_days, found.first_inflow_weekday))
            balance = found.end_balance
        week += timedelta(days=7)
    return rows


def combine(series: list[list[WeekReturn]]) -> list[WeekReturn]:
    """A portfolio's weekly series: per week, the sums over its accounts."""
    weeks: dict[date, list] = {}
    for rows in series:
        for row in rows:
            total = weeks.get(row.week_start)
            if total is None:
                total = weeks[row.week_start] = [0, 0, 0, 0, 0, 0, 0, None]
            total[0] += row.start_balance
            total[1] += row.premium
            total[2] += row.loss
            total[3] += row.fee
            total[4] += row.end_balance
            total[5] += row.flow
            total[6] += row.flow_cent_days
            first = row.first_inflow_weekday
            if first is not None and (total[7] is None or first < total[7]):
                total[7] = first
    return [week_return(week, *weeks[week]) for week in sorted(weeks)]


def window(rows: list[WeekReturn], weeks: int | None) -> list[WeekReturn]:
    return rows[-weeks:] if weeks else rows


def drawdowns(returns: list[float]) -> tuple[float, float]:
    """(max drawdown, current drawdown) of the return index."""
    index = peak = 1.0
    worst = 0.0
    # Comparisons rather than max() calls (the same values: this loop runs for every
    # account of a portfolio on each analytics request).
    for r in returns:
        # A week can lose more than it started with (money arrived during the week): the
        # index cannot fall below zero, so a drawdown stays within 0..1.
        growth = 1.0 + r
        index *= growth if growth > 0.0 else 0.0
        if index > peak:
            peak = index
        fall = (peak - index) / peak if peak > 0 else 0.0
        if fall > worst:
            worst = fall
    return worst, ((peak - index) / peak if peak > 0 else 0.0)


def _annualized(twr: float, n: int) -> float | None:
    if n and 1.0 + twr == 0.0:
        return -1.0  # everything lost: -100% a year, as empyrical's annual_return says
    if not n or not 1.0 + twr > 0 or not math.isfinite(twr):
        return None
    try:
        value = (1.0 + twr) ** (52.0 / n) - 1.0
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def breached(drawdown: float, limit: float) -> bool:
    """The drawdown reached the limit (a hair of float tolerance: a loss of exactly 10%
    computes as 0.09999999999999998)."""
    return limit > 0 and drawdown >= limit - DRAWDOWN_TOLERANCE


def performance(rows: list[WeekReturn], *, weekly_target: float, risk_free_rate: float = 0.0,
                required_return: float = 0.0, full: bool = True) -> Performance:
    """Every performance measure of the window's weekly returns (docs/analytics.md);
    `risk_free_rate` (Sharpe) and `required_return` (Sortino) are annual. Without `full`,
    only what a portfolio's account summary shows (the rest None): it is computed for
    every account of the tree on each request."""
    returns = [row.weekly_return for row in rows if row.weekly_return is not None]
    n = len(returns)
    twr = math.prod(max(0.0, 1.0 + r) for r in returns) - 1.0
    annualized = _annualized(twr, n)
    try:
        volatility = statistics.stdev(returns) * math.sqrt(52) if n >= 2 else 0.0
    except OverflowError:
        volatility = math.inf
    worst, current = drawdowns(returns)
    mean = statistics.fmean(returns) if n else None
    income = {"premium": sum(r.premium for r in rows), "loss": sum(r.loss for r in rows),
              "fee": sum(r.fee for r in rows)}
    income["net"] = income["premium"] - income["loss"] - income["fee"]
    extra = _measures(returns, annualized, volatility, worst, risk_free_rate, required_return) if full \
        else {**dict.fromkeys(SUMMARY_OMITS), "max_drawdown_duration_weeks": 0}
    return Performance(
        weeks=n, time_weighted_return=twr, annualized_return=annualized, volatility=volatility,
        max_drawdown=worst, current_drawdown=current, mean_weekly_return=mean, target_weekly_return=weekly_target,
        meets_target=None if mean is None else mean >= weekly_target, income=income,
        risk_free_rate=risk_free_rate, required_return=required_return, **extra)


SUMMARY_OMITS = ("sharpe", "return_over_volatility", "sortino", "calmar", "value_at_risk_95",
                 "conditional_value_at_risk_95", "best_week", "worst_week", "win_rate", "max_drawdown_duration_weeks",
                 "time_to_recovery_weeks", "skew", "kurtosis")


def _measures(returns: list[float], annualized: float | None, volatility: float, max_drawdown: float,
              risk_free_rate: float, required_return: float) -> dict:
    """The measures in the reference libraries' conventions (engine.measures), and the
    old 'Sharpe', (annualized - risk-free) / volatility, as return_over_volatility."""
    longest, recovery = measures.drawdown_weeks(returns)
    return {
        "sharpe": _finite(measures.sharpe, returns, measures.weekly_rate(risk_free_rate)),
        "return_over_volatility": (annualized - risk_free_rate) / volatility
        if annualized is not None and 1e-12 < volatility < math.inf else None,
        "sortino": _finite(measures.sortino, returns, measures.weekly_rate(required_return)),
        "calmar": measures.calmar(annualized, max_drawdown),
        "value_at_risk_95": _finite(measures.value_at_risk, returns),
        "conditional_value_at_risk_95": _finite(measures.conditional_value_at_risk, returns),
        "best_week": max(returns, default=None), "worst_week": min(returns, default=None),
        "win_rate": measures.win_rate(returns), "max_drawdown_duration_weeks": longest,
        "time_to_recovery_weeks": recovery,
        "skew": _finite(measures.skew, returns), "kurtosis": _finite(measures.kurtosis, returns)}


def _finite(measure, *args) -> float | None:
    """A measure, or None where floats give out (an absurd history - a week earning 10^12
    times its capital - can overflow a power or a mean): JSON has no infinity."""
    try:
        value = measure(*args)
    except (OverflowError, ZeroDivisionError):
        return None
    return value if value is None or math.isfinite(value) else None


def risk(perf: Performance, *, drawdown_limit: float, concentration: float | None) -> Risk:
    flags = ["drawdown_breach"] if breached(perf.current_drawdown, drawdown_limit) else []
    volatility_reference = 2 * perf.target_weekly_return * math.sqrt(52)
    score = (60 * min(1.0, perf.current_drawdown / drawdown_limit if drawdown_limit > 0 else 0.0)
             + 25 * (min(1.0, perf.volatility / volatility_reference) if volatility_reference > 0 else 0.0)
             + 15 * (concentration or 0.0))
    return Risk(drawdown=perf.current_drawdown, drawdown_limit=drawdown_limit, flags=flags,
                concentration=concentration, score=max(0, min(100, round(score))))


def trend(rows: list[WeekReturn]) -> Trend:
    returns = [row.weekly_return for row in rows if row.weekly_return is not None][-TREND_WEEKS:]
    if len(returns) < 2:
        return Trend(weeks=len(returns), slope_per_week=0.0, label="flat")
    xs = range(len(returns))
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(returns)
    slope = (sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, returns))
             / sum((x - x_mean) ** 2 for x in xs))
    label = "improving" if slope > TREND_FLAT_SLOPE else "declining" if slope < -TREND_FLAT_SLOPE else "flat"
    return Trend(weeks=len(returns), slope_per_week=slope, label=label)


def trailing_mean(rows: list[WeekReturn]) -> Fraction | None:
    """The mean of the last 13 weekly returns, exactly (as a fraction). Read from the
    newest week back: only those 13 become fractions."""
    exact = []
    for row in reversed(rows):
        numerator, denominator, _ = dietz(row.start_balance, row.net_trade, row.flow_cent_days,
                                          row.first_inflow_weekday)
        if denominator > 0:
            exact.append(Fraction(numerator, denominator))
            if len(exact) == FORECAST_TRAILING_WEEKS:
                break
    return sum(exact, Fraction(0)) / len(exact) if exact else None


def _round_half_away(rate: Fraction, amount: int) -> int:
    """round(rate * amount), halves away from zero, in integers: floor(|N| / D + 1/2) =
    (2|N| + D) // 2D (the forecast runs this 520 times a request; Fractions are slow)."""
    numerator, denominator = rate.numerator * amount, rate.denominator
    whole = (2 * abs(numerator) + denominator) // (2 * denominator)
    return whole if numerator >= 0 else -whole


def _grow(account: Account, weekly: Fraction, day: date, rules: Rules) -> tuple[Account, bool]:
    """One forecast week, through the live rules: book round(balance * m) as a premium
    (or a loss) with `decide`; returns the account after it and whether it forked."""
    change = _round_half_away(weekly, account.balance)
    # A forecast stops where the rules would: no balance below zero or past its limit.
    change = max(-account.balance, min(change, limits.BALANCE_MAX_CENTS - account.balance))
    if change == 0 or account.status != "active":
        return account, False
    counter = iter(range(1, 1_000_000))
    now = datetime.combine(day, time(12), tzinfo=timezone.utc)
    events = decide(account, BookTrade(kind="premium" if change > 0 else "loss", amount=abs(change)),
                    transaction_id="forecast", now=now, rules=rules,
                    new_id=lambda prefix: f"{prefix}_forecast_{next(counter)}")
    forked = any(getattr(e, "leg", None) is not None and e.leg.kind == "fork" for e in events)
    return mutate_all(account, events), forked


def forecast(account: Account, rows: list[WeekReturn], today: date, rules: Rules = DEFAULT_RULES,
             siblings: list[tuple[Account, list[WeekReturn]]] | None = None,
             unit: Portfolio | None = None, weeks_max: int = FORECAST_WEEKS_MAX) -> Forecast:
    """Balances at 4/13/52 weeks and weeks to the next fork (a portfolio Gen-Acc) or to
    the unit's merge (an account of a forked unit: `unit` and its other accounts in
    `siblings`), each account growing at its own trailing mean weekly return."""
    weekly = trailing_mean(rows)
    if weekly is None:
        return Forecast(trailing_mean_weekly_return=None, balance={str(h): account.balance for h in FORECAST_HORIZONS})
    members = [(account, weekly)] + [(a, trailing_mean(r) or Fraction(0)) for a, r in (siblings or [])]
    balances, next_fork, merge_week = {}, None, None
    day = week_of(today)
    for week in range(1, weeks_max + 1):
        day += timedelta(days=7)
        grown = []
        for index, (member, rate) in enumerate(members):
            member, forked = _grow(member, rate, day, rules)
            grown.append((member, rate))
            if forked and index == 0 and next_fork is None:
                next_fork = week
        members = grown
        if week in FORECAST_HORIZONS:
            balances[str(week)] = members[0][0].balance
        if unit is not None and merge_week is None and merge_due(unit, [m.balance for m, _ in members], rules):
            merge_week = week
        fork_settled = next_fork is not None or not _can_fork(account) \
            or _fork_out_of_reach(members[0][0], weekly, weeks_max - week, rules)
        if week >= FORECAST_HORIZONS[-1] and fork_settled and (merge_week is not None or unit is None):
            break
    return Forecast(trailing_mean_weekly_return=float(weekly), balance=balances,
                    weeks_to_next_fork=next_fork if _can_fork(account) else None,
                    weeks_to_merge=merge_week if unit is not None else None)


def _fork_out_of_reach(account: Account, rate: Fraction, weeks: int, rules: Rules) -> bool:
    """No forecast week within `weeks` can fork: a week adds at most rate * balance + 1/2
    (rounding), so the balance after k weeks is at most (b + k/2) (1 + m)^k, and a fork
    needs baseline + threshold. Lets a slow Gen-Acc's forecast stop at 52 weeks instead of
    simulating all 520 to find nothing (with a margin for the float bound)."""
    if rate <= 0:
        return True  # no premium, no credit: nothing to fork on
    try:
        bound = (account.balance + weeks / 2) * (1.0 + float(rate)) ** weeks
    except OverflowError:
        return False
    return bound * (1 + 1e-9) + 1 < account.baseline + rules.fork_threshold_cents


def _can_fork(account: Account) -> bool:
    return account.type == "generation" and account.portfolio_id is not None


def account_analytics(account: Account, entries: list[Entry] | list[WeekTotals], *, today: date,
                      weeks: int | None = None, rules: Rules = DEFAULT_RULES, risk_free_rate: float = 0.0,
                      required_return: float = 0.0, portfolio_balance: int | None = None, unit: Portfolio | None = None,
                      siblings: list[tuple[Account, list[Entry] | list[WeekTotals]]] | None = None
                      ) -> AccountAnalytics:
    rows = weekly_series(entries, today)
    shown = window(rows, weeks)
    perf = performance(shown, weekly_target=rules.weekly_target_bps.get(account.type, 0) / 10_000,
                       risk_free_rate=risk_free_rate, required_return=required_return)
    concentration = account.balance / portfolio_balance if portfolio_balance else None
    sibling_rows = [(a, weekly_series(e, today)) for a, e in (siblings or [])]
    return AccountAnalytics(
        account_id=account.id, type=account.type, balance=account.balance, weekly_returns=shown,
        performance=perf,
        risk=risk(perf, drawdown_limit=rules.drawdown_limit_bps.get(account.type, 0) / 10_000,
                  concentration=concentration),
        trend=trend(shown), forecast=forecast(account, shown, today, rules, sibling_rows, unit))


class AccountSummary(Struct, frozen=True, kw_only=True):
    account_id: str
    portfolio_id: str | None
    type: str
    status: str
    balance: int
    time_weighted_return: float
    current_drawdown: float
    flags: list[str]
    score: int


class Growth(Struct, frozen=True, kw_only=True):
    units_created: int
    units_merged: int
    units_active: int
    forked_cents: int
    merged_cents: int


class PortfolioForecast(Struct, frozen=True, kw_only=True):
    trailing_mean_weekly_return: float | None
    total_value: dict[str, int]
    weeks_to_next_fork: int | None
    weeks_to_next_merge: int | None


class PortfolioAnalytics(Struct, frozen=True, kw_only=True):
    portfolio_id: str
    balance: int
    weekly_returns: list[WeekReturn]
    performance: Performance
    risk: Risk
    trend: Trend
    forecast: PortfolioForecast
    growth: Growth
    accounts: list[AccountSummary]


def portfolio_analytics(root: Portfolio, portfolios: list[Portfolio], accounts: dict[str, Account],
                        entries: dict[str, list[Entry] | list[WeekTotals]], *, today: date, weeks: int | None = None,
                        rules: Rules = DEFAULT_RULES, risk_free_rate: float = 0.0, required_return: float = 0.0,
                        moved: tuple[int, int] | None = None) -> PortfolioAnalytics:
    """The same measures over a portfolio and every unit below it: Modified Dietz weekly
    returns of the summed net trade results over the summed average capital (flows
    between its accounts - forks, merges - cancel out), each account's own figures, and
    the fork tree's growth."""
    series = {account_id: weekly_series(entries.get(account_id, []), today) for account_id in accounts}
    rows = window(combine(list(series.values())), weeks)
    total = sum(a.balance for a in accounts.values())
    weekly_target = sum(rules.weekly_target_bps.get(a.type, 0) * a.balance for a in accounts.values()) \
        / (10_000 * total) if total else 0.0
    perf = performance(rows, weekly_target=weekly_target, risk_free_rate=risk_free_rate,
                       required_return=required_return)
    summaries = []
    for account_id, account in accounts.items():
        own = performance(window(series[account_id], weeks),
                          weekly_target=rules.weekly_target_bps.get(account.type, 0) / 10_000, full=False)
        own_risk = risk(own, drawdown_limit=rules.drawdown_limit_bps.get(account.type, 0) / 10_000,
                        concentration=account.balance / total if total else None)
        summaries.append(AccountSummary(account_id=account_id, portfolio_id=account.portfolio_id, type=account.type,
                                        status=account.status, balance=account.balance,
                                        time_weighted_return=own.time_weighted_return,
                                        current_drawdown=own.current_drawdown, flags=own_risk.flags,
                                        score=own_risk.score))
    limit = max(rules.drawdown_limit_bps.values()) / 10_000
    worst_score = max((s.score for s in summaries), default=0)
    portfolio_risk = risk(perf, drawdown_limit=limit,
                          concentration=max((a.balance / total for a in accounts.values()), default=None)
                          if total else None)
    portfolio_risk = Risk(drawdown=portfolio_risk.drawdown, drawdown_limit=limit,
                          flags=sorted({f for s in summaries for f in s.flags} | set(portfolio_risk.flags)),
                          concentration=portfolio_risk.concentration, score=max(portfolio_risk.score, worst_score))
    return PortfolioAnalytics(
        portfolio_id=root.id, balance=total, weekly_returns=rows, performance=perf, risk=portfolio_risk,
        trend=trend(rows), forecast=_portfolio_forecast(portfolios, accounts, series, rows, today, rules),
        growth=_growth(root, portfolios, moved if moved is not None else moved_by_growth(entries)),
        accounts=summaries)


def moved_by_growth(entries: dict[str, list[Entry]]) -> tuple[int, int]:
    """(money forked, money merged): fork debits of Gen-Accs and merge debits of units
    in the tree (a merge's credits land in the root's Com-Acc, outside a unit's subtree)."""
    forked = sum(e.amount for rows in entries.values() for e in rows if e.kind == "fork" and e.direction == "debit")
    merged = sum(e.amount for rows in entries.values() for e in rows if e.kind == "merge" and e.direction == "debit")
    return forked, merged


def _growth(root: Portfolio, portfolios: list[Portfolio], moved: tuple[int, int]) -> Growth:
    units = [p for p in portfolios if p.id != root.id]
    forked, merged = moved
    return Growth(units_created=len(units), units_merged=sum(1 for u in units if u.status == "merged"),
                  units_active=sum(1 for u in units if u.status == "active"), forked_cents=forked,
                  merged_cents=merged)


def _portfolio_forecast(portfolios, accounts, series, rows, today, rules) -> PortfolioForecast:
    """Total value grown at the portfolio's trailing mean (forks and merges move money
    inside it, so they do not change the total); the next fork and merge from each
    Gen-Acc's and each active unit's own forecast."""
    weekly = trailing_mean(rows)
    total = sum(a.balance for a in accounts.values())
    values, value = {}, total
    for week in range(1, FORECAST_HORIZONS[-1] + 1):
        value += _round_half_away(weekly or Fraction(0), value)
        if week in FORECAST_HORIZONS:
            values[str(week)] = value
    next_fork = next_merge = None
    for portfolio in portfolios:
        if portfolio.status != "active":
            continue
        generation = accounts.get(portfolio.generation_account_id)
        if generation is not None and generation.status == "active":
            siblings = [(accounts[i], series[i]) for i in portfolio.account_ids
                        if i != generation.id and i in accounts] if portfolio.is_unit else None
            # A later simulation only matters if it finds something sooner than known.
            soonest = max(next_fork or FORECAST_WEEKS_MAX, next_merge or FORECAST_WEEKS_MAX)
            outlook = forecast(generation, series[generation.id], today, rules, siblings,
                               portfolio if portfolio.is_unit else None, weeks_max=soonest)
            next_fork = _earliest(next_fork, outlook.weeks_to_next_fork)
            next_merge = _earliest(next_merge, outlook.weeks_to_merge)
    return PortfolioForecast(trailing_mean_weekly_return=float(weekly) if weekly is not None else None,
                             total_value=values, weeks_to_next_fork=next_fork, weeks_to_next_merge=next_merge)


def _earliest(current: int | None, candidate: int | None) -> int | None:
    if candidate is None:
        return current
    return candidate if current is None else min(current, candidate)


def current_drawdown(entries: list[Entry] | list[WeekTotals], today: date) -> float:
    """The account's current drawdown over its whole history (what the live
    drawdown_breach flag follows)."""
    returns = [row.weekly_return for row in weekly_series(entries, today) if row.weekly_return is not None]
    return drawdowns(returns)[1]
