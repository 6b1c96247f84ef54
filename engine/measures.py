"""Measures of a weekly return series, each in the convention of the reference libraries
(empyrical-reloaded, the maintained fork of Quantopian's empyrical, which pyfolio and
zipline use; QuantStats where empyrical has no such measure). `docs/analytics.md` lists
every formula with the function it matches; `tests/test_analytics_reference.py` compares
them with the library.

Where a library answers NaN or infinity (too few weeks, no dispersion, no drawdown, no
downside) these functions answer None, which the API shows as `null`. Pure functions of
lists of floats: no I/O, no numpy (the core imports only the standard library and
msgspec).
"""
from __future__ import annotations

import math
import sys

WEEKS_PER_YEAR = 52
TAIL_CUTOFF = 0.05  # historical VaR and CVaR at 95%: the worst 5% of weeks
# Two drawdowns equal in exact arithmetic can differ in the last bits of a float: within
# this they are equally deep, and the first one is the maximum drawdown.
DRAWDOWN_TIE = 1e-12
# scipy.stats.skew/kurtosis treat a variance below (epsilon * mean)^2 as zero: the
# moments of near-identical values are rounding noise.
MOMENT_RESOLUTION = sys.float_info.epsilon


def weekly_rate(annual_rate: float) -> float:
    """An annual rate as the weekly rate that compounds to it, (1 + R)^(1/52) - 1, as
    QuantStats converts a risk-free rate for its Sharpe and Sortino ratios."""
    return (1.0 + annual_rate) ** (1.0 / WEEKS_PER_YEAR) - 1.0


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _sample_stdev(values: list[float], mean: float) -> float:
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _constant(values: list[float]) -> bool:
    """No dispersion at all: empyrical's `_zero_dispersion_std` sets the deviation of
    identical values to exactly 0 (their float mean can differ in the last bit)."""
    return max(values) == min(values)


def sharpe(returns: list[float], risk_free_weekly: float = 0.0) -> float | None:
    """empyrical.sharpe_ratio(returns, risk_free, period='weekly'): the mean weekly excess
    return over its sample standard deviation, times sqrt(52). None with fewer than two
    weeks or no dispersion."""
    if len(returns) < 2:
        return None
    excess = [r - risk_free_weekly for r in returns]
    if _constant(excess):
        return None
    mean = _mean(excess)
    return mean / _sample_stdev(excess, mean) * math.sqrt(WEEKS_PER_YEAR)


def sortino(returns: list[float], required_weekly: float = 0.0) -> float | None:
    """empyrical.sortino_ratio(returns, required_return, period='weekly'): the annualized
    mean excess return over the annualized downside deviation sqrt(mean(min(0, r -
    required)^2)), the mean taken over every week. None with fewer than two weeks or no
    week below the required return."""
    if len(returns) < 2:
        return None
    excess = [r - required_weekly for r in returns]
    downside = math.sqrt(math.fsum(min(0.0, x) ** 2 for x in excess) / len(excess))
    if downside == 0.0:
        return None
    return _mean(excess) * WEEKS_PER_YEAR / (downside * math.sqrt(WEEKS_PER_YEAR))


def calmar(annualized_return: float | None, max_drawdown: float) -> float | None:
    """empyrical.calmar_ratio: the annualized return over the maximum drawdown (ours is
    positive, empyrical's negative: the same magnitude). None without a drawdown."""
    if annualized_return is None or max_drawdown <= 0.0:
        return None
    ratio = annualized_return / max_drawdown
    return ratio if math.isfinite(ratio) else None


def value_at_risk(returns: list[float], cutoff: float = TAIL_CUTOFF) -> float | None:
    """empyrical.value_at_risk: the `cutoff` percentile of the weekly returns with linear
    interpolation (numpy's default), as a return: -0.03 means a 3% weekly loss."""
    if not returns:
        return None
    ordered = sorted(returns)
    position = (len(ordered) - 1) * cutoff
    low = math.floor(position)
    if low + 1 >= len(ordered):
        return ordered[low]
    a, b, t = ordered[low], ordered[low + 1], position - low
    # numpy's _lerp: from the nearer end, so the result stays between a and b.
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)


def conditional_value_at_risk(returns: list[float], cutoff: float = TAIL_CUTOFF) -> float | None:
    """empyrical.conditional_value_at_risk: the mean of the worst int((n - 1) * cutoff) + 1
    weekly returns (expected shortfall), as a return."""
    if not returns:
        return None
    tail = sorted(returns)[:int((len(returns) - 1) * cutoff) + 1]
    return _mean(tail)


def win_rate(returns: list[float]) -> float | None:
    """QuantStats' win_rate: winning weeks over weeks that won or lost (flat weeks count
    neither way). None when no week won or lost."""
    wins = sum(1 for r in returns if r > 0)
    losses = sum(1 for r in returns if r < 0)
    return wins / (wins + losses) if wins + losses else None


def _central_moments(returns: list[float]) -> tuple[float, float, float] | None:
    """(m2, m3, m4), the biased central moments; None when the variance is zero for
    scipy (no dispersion, or less than its precision guard)."""
    if len(returns) < 2 or _constant(returns):
        return None
    mean = _mean(returns)
    deviations = [r - mean for r in returns]
    m2 = math.fsum(d * d for d in deviations) / len(returns)
    if m2 <= (MOMENT_RESOLUTION * mean) ** 2:
        return None
    return (m2, math.fsum(d ** 3 for d in deviations) / len(returns),
            math.fsum(d ** 4 for d in deviations) / len(returns))


def skew(returns: list[float]) -> float | None:
    """scipy.stats.skew (bias=True), the skewness in empyrical's and pyfolio's statistics
    tables: m3 / m2^1.5."""
    moments = _central_moments(returns)
    return None if moments is None else moments[1] / moments[0] ** 1.5


def kurtosis(returns: list[float]) -> float | None:
    """scipy.stats.kurtosis (fisher=True, bias=True): the excess kurtosis m4 / m2^2 - 3
    (0 for a normal distribution)."""
    moments = _central_moments(returns)
    return None if moments is None else moments[2] / moments[0] ** 2 - 3.0


def drawdown_weeks(returns: list[float]) -> tuple[int, int | None]:
    """(max drawdown duration, time to recovery), in weeks, on the return index I_0 = 1,
    I_w = I_{w-1} * max(0, 1 + r_w) - pyfolio's drawdown periods (peak, valley, recovery).

    - A drawdown runs from a peak (the last week at the running maximum) to its recovery
      (the first later week back at or above that peak), or to the last week while it
      lasts; its duration is recovery - peak weeks. The longest one, 0 without any.
    - Time to recovery: weeks from the maximum drawdown's valley (its first deepest week;
      drawdowns within 1e-12 count as equally deep) to its recovery; 0 without a
      drawdown; None while it has not recovered."""
    index = peak = 1.0
    peak_week = 0
    longest = 0
    worst, valley_peak, valley_week, recovery = 0.0, 1.0, 0, 0
    for week, r in enumerate(returns, start=1):
        index *= max(0.0, 1.0 + r)
        if index >= peak:
            if week - peak_week > 1:  # the weeks in between were under water
                longest = max(longest, week - peak_week)
            if recovery is None and index >= valley_peak:
                recovery = week - valley_week
            peak, peak_week = index, week
            continue
        drawdown = (peak - index) / peak
        if drawdown > worst + DRAWDOWN_TIE:
            worst, valley_peak, valley_week, recovery = drawdown, peak, week, None
    if peak_week < len(returns):
        longest = max(longest, len(returns) - peak_week)
    return longest, recovery
