"""Recurrence rules of recurring transactions: pure date arithmetic, no DB, no clock.

A definition recurs every ``interval`` weeks, months or years, **anchored to its
start_date**: the n-th occurrence is ``start_date + n * interval`` periods, computed from
the start and never from the previous occurrence. So a monthly definition starting on
Jan 31 falls on Feb 28 (Feb 29 in leap years), then returns to Mar 31, Apr 30, May 31;
a yearly one starting on Feb 29 2024 falls on Feb 28 2025-2027 and Feb 29 2028. A weekly
one keeps its weekday. Nothing falls before start_date or after end_date.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

from backjobs.models import Frequency

FREQUENCIES = tuple(Frequency)

# Months per period for the month-based frequencies.
_MONTHS: dict[str, int] = {Frequency.MONTHLY: 1, Frequency.YEARLY: 12}
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True, slots=True)
class Rule:
    """A definition's schedule, as stored: any values, checked by :func:`problem`."""

    frequency: str
    interval: int
    start_date: date
    end_date: date | None = None


def problem(rule: Rule) -> str | None:
    """Why ``rule`` cannot be scheduled (a short reason), or None when it is valid."""
    if rule.frequency not in FREQUENCIES:
        return f"unknown frequency {rule.frequency!r}"
    if rule.interval < 1:
        return f"interval {rule.interval} is below 1"
    if rule.end_date is not None and rule.end_date < rule.start_date:
        return f"end_date {rule.end_date} is before start_date {rule.start_date}"
    return None


def add_months(anchor: date, months: int) -> date:
    """``anchor`` moved by ``months``, on the anchor's day or the month's last day if shorter.

    Raises OverflowError past year 9999.
    """
    index = anchor.year * 12 + anchor.month - 1 + months
    year, month = divmod(index, 12)
    if not 1 <= year <= 9999:
        raise OverflowError("date out of range")
    return date(year, month + 1, min(anchor.day, month_length(year, month + 1)))


def month_length(year: int, month: int) -> int:
    """Days in ``month`` of ``year`` (Gregorian leap years)."""
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _MONTH_DAYS[month - 1]


def nth(rule: Rule, n: int) -> date:
    """The n-th occurrence (n = 0 is start_date), ignoring end_date."""
    if rule.frequency == Frequency.WEEKLY:
        return rule.start_date + timedelta(weeks=n * rule.interval)
    return add_months(rule.start_date, n * rule.interval * _MONTHS[rule.frequency])


def _first_index(rule: Rule, first: date) -> int:
    """A lower bound on the index of the first occurrence on or after ``first``."""
    if first <= rule.start_date:
        return 0
    if rule.frequency == Frequency.WEEKLY:
        return (first - rule.start_date).days // (7 * rule.interval)
    months = (first.year - rule.start_date.year) * 12 + first.month - rule.start_date.month
    # One period early at most: the anchor day may lie after first's day of month.
    return max(0, months // (rule.interval * _MONTHS[rule.frequency]) - 1)


def iter_occurrences(rule: Rule, *, first: date, last: date) -> Iterator[date]:
    """Occurrences of a valid ``rule`` in ``[first, last]`` (both inclusive), in order."""
    reason = problem(rule)
    if reason is not None:
        raise ValueError(reason)
    if rule.end_date is not None:
        last = min(last, rule.end_date)
    n = _first_index(rule, first)
    while True:
        try:
            day = nth(rule, n)
        except OverflowError:
            return
        if day > last:
            return
        if day >= first:
            yield day
        n += 1


def occurrences(rule: Rule, *, first: date, last: date) -> list[date]:
    """The list of :func:`iter_occurrences`."""
    return list(iter_occurrences(rule, first=first, last=last))
