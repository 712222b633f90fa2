"""The recurrence rules: examples at the edges, and properties against a naive formulation."""

from __future__ import annotations

import calendar
import itertools
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backjobs.jobs.recurrence import Rule, add_months, occurrences, problem


def _d(text: str) -> date:
    return date.fromisoformat(text)


def _days(*texts: str) -> list[date]:
    return [_d(t) for t in texts]


# --- examples ---------------------------------------------------------------------------


def test_monthly_from_jan_31_falls_on_month_ends_and_returns_to_the_31st() -> None:
    rule = Rule("monthly", 1, _d("2023-01-31"))
    got = occurrences(rule, first=_d("2023-01-01"), last=_d("2023-06-30"))
    assert got == _days(
        "2023-01-31", "2023-02-28", "2023-03-31", "2023-04-30", "2023-05-31", "2023-06-30"
    )


def test_monthly_from_jan_31_in_a_leap_year_falls_on_feb_29() -> None:
    rule = Rule("monthly", 1, _d("2024-01-31"))
    got = occurrences(rule, first=_d("2024-02-01"), last=_d("2024-03-31"))
    assert got == _days("2024-02-29", "2024-03-31")


def test_monthly_from_the_30th_keeps_the_30th_after_february() -> None:
    rule = Rule("monthly", 1, _d("2023-01-30"))
    got = occurrences(rule, first=_d("2023-02-01"), last=_d("2023-04-30"))
    assert got == _days("2023-02-28", "2023-03-30", "2023-04-30")


def test_yearly_from_feb_29_falls_on_feb_28_in_common_years() -> None:
    rule = Rule("yearly", 1, _d("2024-02-29"))
    got = occurrences(rule, first=_d("2024-01-01"), last=_d("2028-12-31"))
    assert got == _days("2024-02-29", "2025-02-28", "2026-02-28", "2027-02-28", "2028-02-29")


def test_yearly_every_other_year_from_feb_29() -> None:
    rule = Rule("yearly", 2, _d("2020-02-29"))
    got = occurrences(rule, first=_d("2020-01-01"), last=_d("2026-12-31"))
    assert got == _days("2020-02-29", "2022-02-28", "2024-02-29", "2026-02-28")


def test_century_years_are_not_leap_years_unless_divisible_by_400() -> None:
    rule = Rule("yearly", 100, _d("1996-02-29"))
    got = occurrences(rule, first=_d("1996-01-01"), last=_d("2400-12-31"))
    assert got == _days("1996-02-29", "2096-02-29", "2196-02-29", "2296-02-29", "2396-02-29")
    rule = Rule("monthly", 12 * 4, _d("2096-02-29"))
    assert occurrences(rule, first=_d("2096-01-01"), last=_d("2104-12-31")) == _days(
        "2096-02-29", "2100-02-28", "2104-02-29"
    )


def test_weekly_keeps_the_weekday_and_interval_2_skips_every_other_week() -> None:
    rule = Rule("weekly", 2, _d("2024-02-26"))  # a Monday
    got = occurrences(rule, first=_d("2024-02-01"), last=_d("2024-04-01"))
    assert got == _days("2024-02-26", "2024-03-11", "2024-03-25")
    assert {d.weekday() for d in got} == {0}


def test_monthly_interval_3_is_quarterly_from_the_start() -> None:
    rule = Rule("monthly", 3, _d("2023-11-30"))
    got = occurrences(rule, first=_d("2024-01-01"), last=_d("2024-12-31"))
    assert got == _days("2024-02-29", "2024-05-30", "2024-08-30", "2024-11-30")


def test_nothing_before_start_or_after_end_and_bounds_are_inclusive() -> None:
    rule = Rule("monthly", 1, _d("2024-03-15"), end_date=_d("2024-06-15"))
    got = occurrences(rule, first=_d("2024-01-01"), last=_d("2024-12-31"))
    assert got == _days("2024-03-15", "2024-04-15", "2024-05-15", "2024-06-15")
    assert occurrences(rule, first=_d("2024-04-16"), last=_d("2024-05-15")) == _days("2024-05-15")
    assert occurrences(rule, first=_d("2024-01-01"), last=_d("2024-03-14")) == []


def test_occurrences_stop_at_the_end_of_the_calendar() -> None:
    rule = Rule("monthly", 1, _d("9999-10-31"))
    assert occurrences(rule, first=date.min, last=date.max) == _days(
        "9999-10-31", "9999-11-30", "9999-12-31"
    )
    assert occurrences(Rule("weekly", 1, _d("9999-12-25")), first=date.min, last=date.max) == [
        _d("9999-12-25")
    ]


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (Rule("daily", 1, _d("2024-01-01")), "unknown frequency 'daily'"),
        (Rule("Monthly", 1, _d("2024-01-01")), "unknown frequency 'Monthly'"),
        (Rule("monthly", 0, _d("2024-01-01")), "interval 0 is below 1"),
        (Rule("weekly", -2, _d("2024-01-01")), "interval -2 is below 1"),
        (
            Rule("yearly", 1, _d("2024-01-02"), _d("2024-01-01")),
            "end_date 2024-01-01 is before start_date 2024-01-02",
        ),
    ],
)
def test_invalid_rules_are_refused_with_a_reason(rule: Rule, reason: str) -> None:
    assert problem(rule) == reason
    with pytest.raises(ValueError, match=reason.split(" ")[0]):
        occurrences(rule, first=_d("2024-01-01"), last=_d("2024-12-31"))


def test_a_one_day_definition_is_valid() -> None:
    rule = Rule("weekly", 1, _d("2024-01-01"), _d("2024-01-01"))
    assert problem(rule) is None
    assert occurrences(rule, first=date.min, last=date.max) == [_d("2024-01-01")]


# --- properties against an independent formulation ---------------------------------------


def _naive(rule: Rule, *, first: date, last: date) -> list[date]:
    """Walk the calendar period by period from the start (no date arithmetic shortcuts)."""
    last = min(last, rule.end_date or last)
    found: list[date] = []
    if rule.frequency == "weekly":
        day = rule.start_date
        while day <= last:
            if day >= first and (day - rule.start_date).days % (7 * rule.interval) == 0:
                found.append(day)
            day += timedelta(days=1)
        return found
    step = rule.interval * (12 if rule.frequency == "yearly" else 1)
    year, month, k = rule.start_date.year, rule.start_date.month, 0
    while year <= last.year:
        if k % step == 0:
            day = date(year, month, min(rule.start_date.day, calendar.monthrange(year, month)[1]))
            if first <= day <= last:
                found.append(day)
        year, month, k = year + month // 12, month % 12 + 1, k + 1
    return found


starts = st.dates(min_value=date(1996, 1, 1), max_value=date(2032, 12, 31))
rules = st.builds(
    Rule,
    frequency=st.sampled_from(["weekly", "monthly", "yearly"]),
    interval=st.integers(min_value=1, max_value=5),
    start_date=starts,
    end_date=st.none() | st.dates(min_value=date(2034, 1, 1), max_value=date(2040, 12, 31)),
)
open_ended_rules = st.builds(
    Rule,
    frequency=st.sampled_from(["weekly", "monthly", "yearly"]),
    interval=st.integers(min_value=1, max_value=5),
    start_date=starts,
    end_date=st.none(),
)


@settings(deadline=None, max_examples=300)
@given(rule=rules, first=starts, span=st.integers(min_value=0, max_value=3000))
def test_occurrences_match_a_calendar_walk(rule: Rule, first: date, span: int) -> None:
    last = first + timedelta(days=span)
    assert occurrences(rule, first=first, last=last) == _naive(rule, first=first, last=last)


@settings(deadline=None, max_examples=300)
@given(rule=rules, first=starts, span=st.integers(min_value=0, max_value=4000))
def test_occurrences_are_increasing_in_bounds_and_on_the_anchor_day(
    rule: Rule, first: date, span: int
) -> None:
    last = first + timedelta(days=span)
    got = occurrences(rule, first=first, last=last)
    assert all(a < b for a, b in itertools.pairwise(got))
    assert all(max(first, rule.start_date) <= d <= last for d in got)
    assert all(rule.end_date is None or d <= rule.end_date for d in got)
    for day in got:
        if rule.frequency == "weekly":
            assert day.weekday() == rule.start_date.weekday()
        else:
            month_end = calendar.monthrange(day.year, day.month)[1]
            assert day.day == min(rule.start_date.day, month_end)
        if rule.frequency == "yearly":
            assert day.month == rule.start_date.month


@settings(deadline=None, max_examples=200)
@given(rule=open_ended_rules, year=st.integers(2034, 2040))
def test_count_per_year_matches_the_frequency(rule: Rule, year: int) -> None:
    got = occurrences(rule, first=date(year, 1, 1), last=date(year, 12, 31))
    if rule.frequency == "monthly":
        # 12 months / interval, give or take the partial period at the year's edges.
        assert len(got) in {12 // rule.interval, -(-12 // rule.interval)}
    elif rule.frequency == "yearly":
        assert len(got) == (1 if (year - rule.start_date.year) % rule.interval == 0 else 0)
    else:
        # 365 or 366 days hold 52 or 53 weeks.
        assert len(got) in {52 // rule.interval, -(-53 // rule.interval)}


def test_add_months_clamps_to_the_month_end() -> None:
    assert add_months(_d("2024-01-31"), 1) == _d("2024-02-29")
    assert add_months(_d("2024-01-31"), 2) == _d("2024-03-31")
    assert add_months(_d("2024-03-31"), -1) == _d("2024-02-29")
    with pytest.raises(OverflowError):
        add_months(_d("9999-12-01"), 1)
