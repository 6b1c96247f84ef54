"""What the reference library says about a weekly return series, and the check that our
`Performance` agrees with it: empyrical-reloaded (the maintained fork of Quantopian's
empyrical) for every measure it has, scipy.stats for skew and kurtosis (the functions
empyrical's own statistics table uses), QuantStats' win-rate formula and pyfolio's
drawdown periods written out with numpy on empyrical's drawdown series. A library's NaN
or infinity must be our None (`null`). Used by tests/test_analytics_reference.py and
tests/test_analytics_engine.py; imported only by tests (a test dependency)."""
from __future__ import annotations

import math
import warnings

import empyrical
import empyrical.stats
import numpy as np
import pytest
from scipy import stats

WEEKLY = "weekly"
# The bar: agreement to 1e-6. Most measures agree to ~1e-12 (our sums are exact,
# math.fsum; numpy's are pairwise), but the annualizing power (52/n) and a drawdown's
# division amplify a last-bit difference of the compounded product (seen: 1e-9 in Calmar).
REL = 1e-6
ABS = 1e-9


def weekly_rate(annual: float) -> float:
    """QuantStats' conversion of an annual rate to a per-period one."""
    return (1 + annual) ** (1 / 52) - 1


def pyfolio_drawdown_weeks(returns: np.ndarray) -> tuple[int, int | None]:
    """(longest drawdown, time to recovery of the deepest) in weeks, as pyfolio reads its
    underwater series: a drawdown runs from the last week at the peak (underwater 0) to
    the next week at 0 again; the deepest one's valley is np.argmin of the series."""
    underwater = np.concatenate([[0.0], empyrical.stats.drawdown_series(returns)])  # week 0 = the start
    at_peak = np.flatnonzero(underwater == 0.0)
    gaps = np.diff(at_peak)
    # recovered drawdowns: peak to peak with weeks under water between; the last one may last
    longest = int(max(gaps[gaps > 1].max(initial=0), len(underwater) - 1 - at_peak[-1]))
    # the first of the deepest valleys (equal in exact arithmetic: to 1e-12)
    valley = int(np.flatnonzero(underwater <= underwater.min() + 1e-12)[0])
    if underwater[valley] == 0.0:
        return longest, 0
    after = at_peak[at_peak > valley]
    return longest, (int(after[0]) - valley) if after.size else None


def reference(returns: list[float], risk_free_rate: float = 0.0, required_return: float = 0.0) -> dict:
    series = np.asarray(returns, dtype=float)
    nonzero = int((series != 0).sum())
    longest, recovery = pyfolio_drawdown_weeks(series)
    # scipy warns of "precision loss" on identical values, and answers NaN: that is the case.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "time_weighted_return": empyrical.cum_returns_final(series),
            "annualized_return": empyrical.annual_return(series, period=WEEKLY),
            "volatility": empyrical.annual_volatility(series, period=WEEKLY),
            "sharpe": empyrical.sharpe_ratio(series, risk_free=weekly_rate(risk_free_rate), period=WEEKLY),
            "sortino": empyrical.sortino_ratio(series, required_return=weekly_rate(required_return), period=WEEKLY),
            "calmar": empyrical.calmar_ratio(series, period=WEEKLY),
            "max_drawdown": -empyrical.max_drawdown(series),
            "value_at_risk_95": empyrical.value_at_risk(series, cutoff=0.05),
            "conditional_value_at_risk_95": empyrical.conditional_value_at_risk(series, cutoff=0.05),
            "skew": stats.skew(series),
            "kurtosis": stats.kurtosis(series),
            "best_week": series.max(),
            "worst_week": series.min(),
            "mean_weekly_return": series.mean(),
            "win_rate": (series > 0).sum() / nonzero if nonzero else math.nan,
            "max_drawdown_duration_weeks": longest,
            "time_to_recovery_weeks": recovery,
        }


def assert_matches_reference(performance, returns: list[float], risk_free_rate: float = 0.0,
                             required_return: float = 0.0) -> None:
    """Every shared measure of `performance` (a Struct or its JSON dict) equals the
    library's on `returns`; the library's NaN/inf is our None. Volatility is the one
    documented exception: 0, not null, with fewer than two weeks (the field predates
    this comparison and is not nullable)."""
    ours = performance if isinstance(performance, dict) else {
        name: getattr(performance, name) for name in performance.__struct_fields__}
    assert ours["weeks"] == len(returns)
    for name, theirs in reference(returns, risk_free_rate, required_return).items():
        mine = ours[name]
        if name == "volatility" and len(returns) < 2:
            assert mine == 0.0 and math.isnan(theirs)
        elif theirs is None or not math.isfinite(theirs):
            assert mine is None, (name, mine, theirs)
        else:
            assert mine is not None, (name, theirs)
            assert mine == pytest.approx(float(theirs), rel=REL, abs=ABS), (name, mine, theirs)
