"""Business-hours arithmetic in WIB, Indonesian holidays, and service-level configuration."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ticketing.sla import (
    DEFAULT_HOLIDAYS,
    DEFAULT_POLICIES,
    HOLIDAY_NAMES,
    BusinessCalendar,
    TierPolicy,
    calendar_from_config,
    due_times,
    parse_duration,
    policies_from_config,
)

WIB = ZoneInfo("Asia/Jakarta")
CAL = BusinessCalendar()
H = timedelta(hours=1)


def wib(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=WIB)


# --- examples -----------------------------------------------------------------------------------


def test_add_within_one_day_and_across_the_night() -> None:
    assert CAL.add(wib(2026, 5, 4, 9), 4 * H) == wib(2026, 5, 4, 13)
    # Ends exactly at closing time rather than at the next opening.
    assert CAL.add(wib(2026, 5, 4, 8), 8 * H) == wib(2026, 5, 4, 16)
    assert CAL.add(wib(2026, 5, 4, 14), 4 * H) == wib(2026, 5, 5, 10)


def test_add_from_outside_business_hours_starts_at_opening() -> None:
    assert CAL.add(wib(2026, 5, 4, 6, 30), 1 * H) == wib(2026, 5, 4, 9)
    assert CAL.add(wib(2026, 5, 4, 20), 1 * H) == wib(2026, 5, 5, 9)
    # Saturday 2 May 2026 → Monday 4 May.
    assert CAL.add(wib(2026, 5, 2, 11), 2 * H) == wib(2026, 5, 4, 10)
    assert CAL.add(wib(2026, 5, 2, 11), timedelta(0)) == wib(2026, 5, 2, 11)


def test_add_skips_idul_fitri_and_collective_leave_2026() -> None:
    # Tue 17 Mar 2026, 14:00: 18 Mar cuti bersama Nyepi, 19 Nyepi, 20 cuti, 21–22 Idul Fitri
    # (weekend), 23–24 cuti bersama; work resumes Wednesday 25 March.
    assert CAL.add(wib(2026, 3, 17, 14), 4 * H) == wib(2026, 3, 25, 10)
    assert CAL.elapsed(wib(2026, 3, 17, 14), wib(2026, 3, 25, 10)) == 4 * H


def test_add_converts_other_zones() -> None:
    # 01:00 UTC is 08:00 WIB.
    assert CAL.add(datetime(2026, 5, 4, 1, 0, tzinfo=UTC), H) == wib(2026, 5, 4, 9)
    with pytest.raises(ValueError, match="aware"):
        CAL.add(datetime(2026, 5, 4, 9), H)
    with pytest.raises(ValueError, match="negative"):
        CAL.add(wib(2026, 5, 4, 9), -H)


def test_elapsed_examples() -> None:
    assert CAL.elapsed(wib(2026, 5, 4, 9), wib(2026, 5, 4, 9)) == timedelta(0)
    assert CAL.elapsed(wib(2026, 5, 1, 9), wib(2026, 5, 4, 8)) == timedelta(0)  # Labour Day
    assert CAL.elapsed(wib(2026, 4, 30, 15), wib(2026, 5, 4, 9)) == 2 * H
    assert CAL.elapsed(wib(2026, 5, 4, 9), wib(2026, 4, 30, 15)) == -2 * H
    assert CAL.elapsed(wib(2026, 5, 4, 0), wib(2026, 5, 11, 0)) == 5 * 8 * H


def test_due_times_per_tier() -> None:
    opened = wib(2026, 5, 4, 14)  # Monday
    assert due_times(opened, "agent", CAL) == (wib(2026, 5, 5, 10), wib(2026, 5, 6, 14))
    assert due_times(opened, "support", CAL) == (wib(2026, 5, 5, 14), wib(2026, 5, 7, 14))
    assert due_times(opened, "management", CAL) == (wib(2026, 5, 6, 14), wib(2026, 5, 11, 14))
    # Thu 14 May (Ascension) and Fri 15 May (cuti bersama) are skipped.
    assert due_times(wib(2026, 5, 11, 14), "management", CAL) == (
        wib(2026, 5, 13, 14),
        wib(2026, 5, 20, 14),
    )
    with pytest.raises(ValueError, match="tier 'boss'"):
        due_times(opened, "boss", CAL)


def test_default_policies() -> None:
    assert DEFAULT_POLICIES["agent"] == TierPolicy(4 * H, 16 * H)
    assert DEFAULT_POLICIES["support"] == TierPolicy(8 * H, 24 * H)
    assert DEFAULT_POLICIES["management"] == TierPolicy(16 * H, 40 * H)


@pytest.mark.parametrize("year", [2025, 2026, 2027])
def test_default_holidays_cover_each_year(year: int) -> None:
    names = {name for day, name in HOLIDAY_NAMES.items() if day.year == year}
    for holiday in [
        "Tahun Baru Masehi",
        "Isra Mi'raj",
        "Imlek",
        "Nyepi",
        "Idul Fitri",
        "Wafat Isa Almasih",
        "Paskah",
        "Hari Buruh",
        "Waisak",
        "Kenaikan Isa Almasih",
        "Pancasila",
        "Idul Adha",
        "Tahun Baru Islam",
        "Kemerdekaan",
        "Maulid Nabi",
        "Natal",
        "Cuti bersama",
    ]:
        assert any(holiday in name for name in names), (year, holiday)
    for fixed in [(1, 1), (5, 1), (6, 1), (8, 17), (12, 25)]:
        assert date(year, *fixed) in DEFAULT_HOLIDAYS


def test_known_holiday_dates() -> None:
    for day in ["2025-03-31", "2025-04-01", "2025-08-18", "2026-03-20", "2026-05-27", "2027-03-10"]:
        assert date.fromisoformat(day) in DEFAULT_HOLIDAYS
    assert not CAL.is_business_day(date(2026, 3, 24))
    assert CAL.is_business_day(date(2026, 3, 25))


# --- configuration ------------------------------------------------------------------------------


def test_policies_from_config() -> None:
    policies = policies_from_config(
        {"agent": {"first_response": "4h", "resolution": "16h"}, "support": {"resolution": "1d 4h"}}
    )
    assert policies["agent"] == TierPolicy(4 * H, 16 * H)
    assert policies["support"] == TierPolicy(DEFAULT_POLICIES["support"].first_response, 12 * H)
    assert policies["management"] == DEFAULT_POLICIES["management"]
    short_days = BusinessCalendar(start=time(9), end=time(15))
    assert policies_from_config({"agent": {"resolution": "2d"}}, calendar=short_days)[
        "agent"
    ].resolution == (12 * H)


@pytest.mark.parametrize(
    "config",
    [
        {"boss": {"first_response": "1h"}},
        {"agent": "4h"},
        {"agent": {"first_reply": "4h"}},
        {"agent": {"first_response": "four hours"}},
        {"agent": {"resolution": "-4h"}},
    ],
)
def test_policies_from_config_refuses_mistakes(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        policies_from_config(config)


def test_parse_duration() -> None:
    assert parse_duration("4h") == 4 * H
    assert parse_duration(" 1d 4h 30m ") == 12.5 * H
    assert parse_duration("1.5h") == 1.5 * H
    assert parse_duration("90m") == 1.5 * H
    assert parse_duration(3600) == H
    for bad in ["", "4", "h", "4x", "4h four", True]:
        with pytest.raises(ValueError):
            parse_duration(bad)  # type: ignore[arg-type]


def test_calendar_from_config() -> None:
    calendar = calendar_from_config(
        {
            "timezone": "Asia/Makassar",
            "start": "07:30",
            "end": "15:30",
            "workdays": ["mon", "tuesday", 5],
            "holidays": ["2026-05-04"],
        }
    )
    assert calendar == BusinessCalendar(
        tz="Asia/Makassar",
        start=time(7, 30),
        end=time(15, 30),
        workdays=frozenset({0, 1, 5}),
        holidays=frozenset({date(2026, 5, 4)}),
    )
    wita = ZoneInfo("Asia/Makassar")
    # Monday 4 May is a configured holiday; Tuesday opens at 07:30 WITA.
    assert calendar.add(datetime(2026, 5, 4, 8, tzinfo=wita), H) == datetime(
        2026, 5, 5, 8, 30, tzinfo=wita
    )
    assert calendar_from_config({}) == BusinessCalendar()


@pytest.mark.parametrize(
    "config",
    [
        {"start": "16:00", "end": "08:00"},
        {"workdays": []},
        {"workdays": ["funday"]},
        {"workdays": [7]},
        {"holidays": ["not a date"]},
        {"timezone": "Mars/Olympus"},
        {"hours": "8-16"},
    ],
)
def test_calendar_from_config_refuses_mistakes(config: dict[str, object]) -> None:
    with pytest.raises((ValueError, KeyError)):
        calendar_from_config(config)


# --- properties ---------------------------------------------------------------------------------

moments = st.datetimes(
    min_value=datetime(2024, 12, 1), max_value=datetime(2027, 12, 20), timezones=st.just(WIB)
)
durations = st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=200))


@st.composite
def calendars(draw: st.DrawFn) -> BusinessCalendar:
    start_hour = draw(st.integers(0, 12))
    end_hour = draw(st.integers(start_hour + 1, 23))
    workdays = draw(st.frozensets(st.integers(0, 6), min_size=1))
    holidays = draw(st.frozensets(st.dates(date(2025, 1, 1), date(2027, 12, 31)), max_size=40))
    return BusinessCalendar(
        start=time(start_hour),
        end=time(end_hour, draw(st.sampled_from([0, 30]))),
        workdays=workdays,
        holidays=holidays,
    )


def in_business_hours(calendar: BusinessCalendar, moment: datetime) -> bool:
    local = moment.astimezone(calendar.zone)
    return calendar.is_business_day(local.date()) and calendar.start <= local.time() <= calendar.end


@given(moments, durations, durations)
def test_add_is_monotonic_in_duration(start: datetime, first: timedelta, second: timedelta) -> None:
    short, long = sorted([first, second])
    assert CAL.add(start, short) <= CAL.add(start, long)


@given(moments, moments, durations)
def test_add_is_monotonic_in_start(a: datetime, b: datetime, duration: timedelta) -> None:
    early, late = sorted([a, b])
    assert CAL.add(early, duration) <= CAL.add(late, duration)


@given(calendars(), moments, durations)
def test_add_lands_in_business_hours(
    calendar: BusinessCalendar, start: datetime, duration: timedelta
) -> None:
    assume(duration > timedelta(0))
    due = calendar.add(start, duration)
    assert due - start >= duration  # business time never runs faster than the clock
    assert in_business_hours(calendar, due)
    assert due.weekday() in calendar.workdays
    assert due.date() not in calendar.holidays


@given(calendars(), moments, durations)
def test_elapsed_undoes_add(
    calendar: BusinessCalendar, start: datetime, duration: timedelta
) -> None:
    assert calendar.elapsed(start, calendar.add(start, duration)) == duration


@st.composite
def business_moments(draw: st.DrawFn) -> datetime:
    """A moment inside the default calendar's business hours (drawn there, not filtered)."""
    day = draw(st.dates(date(2024, 12, 1), date(2027, 12, 20)).filter(CAL.is_business_day))
    opens = datetime.combine(day, CAL.start, tzinfo=WIB)
    closes = datetime.combine(day, CAL.end, tzinfo=WIB)
    seconds = draw(st.integers(0, int((closes - opens).total_seconds())))
    return opens + timedelta(seconds=seconds)


@given(business_moments(), durations)
def test_elapsed_undoes_add_from_inside_business_hours(
    start: datetime, duration: timedelta
) -> None:
    assert in_business_hours(CAL, start)
    due = CAL.add(start, duration)
    assert CAL.elapsed(start, due) == duration


@given(moments, moments, moments)
def test_elapsed_adds_up(a: datetime, b: datetime, c: datetime) -> None:
    assert CAL.elapsed(a, b) + CAL.elapsed(b, c) == CAL.elapsed(a, c)
    assert CAL.elapsed(a, b) == -CAL.elapsed(b, a)


@given(st.dates(date(2025, 1, 1), date(2027, 12, 31)))
def test_a_whole_holiday_or_weekend_counts_for_nothing(day: date) -> None:
    start = datetime.combine(day, time(0), tzinfo=WIB)
    worked = CAL.elapsed(start, start + timedelta(days=1))
    expected = 8 * H if day.weekday() < 5 and day not in DEFAULT_HOLIDAYS else timedelta(0)
    assert worked == expected
