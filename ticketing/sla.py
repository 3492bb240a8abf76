"""Business-hours arithmetic (WIB by default) and the due times of each tier's service levels."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

# Indonesia's national public holidays (libur nasional) and collective leave (cuti bersama),
# as set by the joint decree of three ministers (SKB 3 Menteri) for each year. The government
# sets, and sometimes changes, these dates every year, so the list is configuration: a
# deployment overrides it with `holidays = [...]` in its calendar section.
_HOLIDAYS_BY_YEAR: dict[int, tuple[tuple[str, str], ...]] = {
    2025: (
        ("2025-01-01", "Tahun Baru Masehi"),
        ("2025-01-27", "Isra Mi'raj Nabi Muhammad SAW"),
        ("2025-01-28", "Cuti bersama Tahun Baru Imlek"),
        ("2025-01-29", "Tahun Baru Imlek 2576"),
        ("2025-03-28", "Cuti bersama Nyepi"),
        ("2025-03-29", "Hari Suci Nyepi, Tahun Baru Saka 1947"),
        ("2025-03-31", "Idul Fitri 1446 H"),
        ("2025-04-01", "Idul Fitri 1446 H"),
        ("2025-04-02", "Cuti bersama Idul Fitri"),
        ("2025-04-03", "Cuti bersama Idul Fitri"),
        ("2025-04-04", "Cuti bersama Idul Fitri"),
        ("2025-04-07", "Cuti bersama Idul Fitri"),
        ("2025-04-18", "Wafat Isa Almasih"),
        ("2025-04-20", "Kebangkitan Isa Almasih (Paskah)"),
        ("2025-05-01", "Hari Buruh Internasional"),
        ("2025-05-12", "Hari Raya Waisak 2569 BE"),
        ("2025-05-13", "Cuti bersama Waisak"),
        ("2025-05-29", "Kenaikan Isa Almasih"),
        ("2025-05-30", "Cuti bersama Kenaikan Isa Almasih"),
        ("2025-06-01", "Hari Lahir Pancasila"),
        ("2025-06-06", "Idul Adha 1446 H"),
        ("2025-06-09", "Cuti bersama Idul Adha"),
        ("2025-06-27", "Tahun Baru Islam 1447 H"),
        ("2025-08-17", "Hari Kemerdekaan Republik Indonesia"),
        ("2025-08-18", "Cuti bersama Hari Kemerdekaan (ditetapkan Agustus 2025)"),
        ("2025-09-05", "Maulid Nabi Muhammad SAW"),
        ("2025-12-25", "Hari Raya Natal"),
        ("2025-12-26", "Cuti bersama Natal"),
    ),
    2026: (
        ("2026-01-01", "Tahun Baru Masehi"),
        ("2026-01-16", "Isra Mi'raj Nabi Muhammad SAW"),
        ("2026-02-16", "Cuti bersama Tahun Baru Imlek"),
        ("2026-02-17", "Tahun Baru Imlek 2577"),
        ("2026-03-18", "Cuti bersama Nyepi"),
        ("2026-03-19", "Hari Suci Nyepi, Tahun Baru Saka 1948"),
        ("2026-03-20", "Cuti bersama Idul Fitri"),
        ("2026-03-21", "Idul Fitri 1447 H"),
        ("2026-03-22", "Idul Fitri 1447 H"),
        ("2026-03-23", "Cuti bersama Idul Fitri"),
        ("2026-03-24", "Cuti bersama Idul Fitri"),
        ("2026-04-03", "Wafat Isa Almasih"),
        ("2026-04-05", "Kebangkitan Isa Almasih (Paskah)"),
        ("2026-05-01", "Hari Buruh Internasional"),
        ("2026-05-14", "Kenaikan Isa Almasih"),
        ("2026-05-15", "Cuti bersama Kenaikan Isa Almasih"),
        ("2026-05-27", "Idul Adha 1447 H"),
        ("2026-05-28", "Cuti bersama Idul Adha"),
        ("2026-05-31", "Hari Raya Waisak 2570 BE"),
        ("2026-06-01", "Hari Lahir Pancasila"),
        ("2026-06-16", "Tahun Baru Islam 1448 H"),
        ("2026-08-17", "Hari Kemerdekaan Republik Indonesia"),
        ("2026-08-25", "Maulid Nabi Muhammad SAW"),
        ("2026-12-24", "Cuti bersama Natal"),
        ("2026-12-25", "Hari Raya Natal"),
    ),
    2027: (
        ("2027-01-01", "Tahun Baru Masehi"),
        ("2027-01-05", "Isra Mi'raj Nabi Muhammad SAW"),
        ("2027-02-05", "Cuti bersama Tahun Baru Imlek"),
        ("2027-02-06", "Tahun Baru Imlek 2578"),
        ("2027-03-08", "Hari Suci Nyepi, Tahun Baru Saka 1949"),
        ("2027-03-09", "Cuti bersama Idul Fitri"),
        ("2027-03-10", "Idul Fitri 1448 H"),
        ("2027-03-11", "Idul Fitri 1448 H"),
        ("2027-03-12", "Cuti bersama Idul Fitri"),
        ("2027-03-15", "Cuti bersama Idul Fitri"),
        ("2027-03-25", "Cuti bersama Wafat Isa Almasih"),
        ("2027-03-26", "Wafat Isa Almasih"),
        ("2027-03-28", "Kebangkitan Isa Almasih (Paskah)"),
        ("2027-05-01", "Hari Buruh Internasional"),
        ("2027-05-06", "Kenaikan Isa Almasih"),
        ("2027-05-17", "Idul Adha 1448 H"),
        ("2027-05-18", "Cuti bersama Idul Adha"),
        ("2027-05-19", "Cuti bersama Waisak"),
        ("2027-05-20", "Hari Raya Waisak 2571 BE"),
        ("2027-06-01", "Hari Lahir Pancasila"),
        ("2027-06-06", "Tahun Baru Islam 1449 H"),
        ("2027-08-15", "Maulid Nabi Muhammad SAW"),
        ("2027-08-17", "Hari Kemerdekaan Republik Indonesia"),
        ("2027-12-24", "Cuti bersama Natal"),
        ("2027-12-25", "Hari Raya Natal"),
        # The Hijri year 1449 has a second Isra Mi'raj inside 2027.
        ("2027-12-26", "Isra Mi'raj Nabi Muhammad SAW"),
    ),
}

HOLIDAY_NAMES: dict[date, str] = {
    date.fromisoformat(day): name for year in _HOLIDAYS_BY_YEAR.values() for day, name in year
}
DEFAULT_HOLIDAYS: frozenset[date] = frozenset(HOLIDAY_NAMES)

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class BusinessCalendar:
    """Working hours `start`–`end` on `workdays` (0 = Monday) in `tz`, minus `holidays`.

    Times are wall-clock times in `tz`; Asia/Jakarta has no daylight saving time.
    """

    tz: str = "Asia/Jakarta"
    start: time = time(8, 0)
    end: time = time(16, 0)
    workdays: frozenset[int] = frozenset({0, 1, 2, 3, 4})
    holidays: frozenset[date] = field(default=DEFAULT_HOLIDAYS, repr=False)
    zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workdays", frozenset(self.workdays))
        object.__setattr__(self, "holidays", frozenset(self.holidays))
        # An empty working day or week would make `add` search forever.
        if not self.start < self.end:
            raise ValueError(f"business day must start before it ends ({self.start}–{self.end})")
        if not self.workdays or not self.workdays <= set(range(7)):
            raise ValueError("workdays must be a non-empty set of weekday numbers 0–6")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("start and end are wall-clock times without a time zone")
        object.__setattr__(self, "zone", ZoneInfo(self.tz))

    @property
    def day_length(self) -> timedelta:
        """Business time in one working day."""
        return _on(date.min, self.end) - _on(date.min, self.start)

    def is_business_day(self, day: date) -> bool:
        """True for a working weekday that is not a holiday."""
        return day.weekday() in self.workdays and day not in self.holidays

    def add(self, start: datetime, duration: timedelta) -> datetime:
        """The moment `duration` of business time after `start` (in the calendar's zone).

        Nights, non-working days and holidays do not count. A zero duration returns `start`.
        """
        if duration < timedelta(0):
            raise ValueError("duration must not be negative")
        cursor = self._local(start)
        remaining = duration
        if not remaining:
            return cursor
        day = cursor.date()
        while True:
            if self.is_business_day(day):
                opens = self._at(day, self.start)
                closes = self._at(day, self.end)
                begin = max(cursor, opens)
                if begin < closes:
                    available = closes - begin
                    if remaining <= available:
                        return begin + remaining
                    remaining -= available
            day += timedelta(days=1)

    def elapsed(self, start: datetime, end: datetime) -> timedelta:
        """Business time between `start` and `end`; negative when `end` is before `start`."""
        first, last = self._local(start), self._local(end)
        if last < first:
            return -self.elapsed(end, start)
        total = timedelta(0)
        day = first.date()
        while day <= last.date():
            if self.is_business_day(day):
                begin = max(first, self._at(day, self.start))
                finish = min(last, self._at(day, self.end))
                if begin < finish:
                    total += finish - begin
            day += timedelta(days=1)
        return total

    def _local(self, moment: datetime) -> datetime:
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError("business-time arithmetic needs an aware datetime")
        return moment.astimezone(self.zone)

    def _at(self, day: date, wall: time) -> datetime:
        return datetime.combine(day, wall, tzinfo=self.zone)


@dataclass(frozen=True)
class TierPolicy:
    """Business time allowed for a tier to first answer a ticket, and to resolve it."""

    first_response: timedelta
    resolution: timedelta


_BUSINESS_DAY = timedelta(hours=8)
DEFAULT_POLICIES: dict[str, TierPolicy] = {
    "agent": TierPolicy(first_response=timedelta(hours=4), resolution=2 * _BUSINESS_DAY),
    "support": TierPolicy(first_response=timedelta(hours=8), resolution=3 * _BUSINESS_DAY),
    "management": TierPolicy(first_response=timedelta(hours=16), resolution=5 * _BUSINESS_DAY),
}


def due_times(
    opened_at: datetime,
    tier: str,
    calendar: BusinessCalendar,
    policies: Mapping[str, TierPolicy] = DEFAULT_POLICIES,
) -> tuple[datetime, datetime]:
    """(first response due, resolution due) for a ticket that reached `tier` at `opened_at`."""
    try:
        policy = policies[tier]
    except KeyError:
        raise ValueError(f"no service level configured for tier {tier!r}") from None
    return (
        calendar.add(opened_at, policy.first_response),
        calendar.add(opened_at, policy.resolution),
    )


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(d|h|m|s)\s*", re.IGNORECASE)
_UNIT = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_duration(
    text: str | int | float, *, business_day: timedelta = _BUSINESS_DAY
) -> timedelta:
    """`"4h"`, `"1d 4h"`, `"90m"` or a number of seconds. A day (`d`) is one business day."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"duration must not be negative: {text!r}")
        return timedelta(seconds=text)
    total = timedelta(0)
    position = 0
    source = text.strip()
    if not source:
        raise ValueError("empty duration")
    for match in _DURATION.finditer(source):
        if match.start() != position:
            break
        amount = float(match.group(1))
        unit = match.group(2).lower()
        total += amount * business_day if unit == "d" else timedelta(**{_UNIT[unit]: amount})
        position = match.end()
    if position != len(source):
        raise ValueError(f"not a duration: {text!r} (use e.g. 4h, 2d, 1d 4h, 90m)")
    return total


def policies_from_config(
    config: Mapping[str, Any], *, calendar: BusinessCalendar | None = None
) -> dict[str, TierPolicy]:
    """Tier policies from e.g. `{"agent": {"first_response": "4h", "resolution": "16h"}}`.

    Tiers left out keep their default; `d` counts business days of the calendar's length.
    """
    business_day = calendar.day_length if calendar is not None else _BUSINESS_DAY
    policies = dict(DEFAULT_POLICIES)
    for tier, entry in config.items():
        if tier not in DEFAULT_POLICIES:
            raise ValueError(f"unknown tier {tier!r} in service levels")
        if not isinstance(entry, Mapping):
            raise ValueError(f"service level for {tier!r} must be a table")
        unknown = set(entry) - {"first_response", "resolution"}
        if unknown:
            raise ValueError(f"unknown keys for tier {tier!r}: {', '.join(sorted(unknown))}")
        default = DEFAULT_POLICIES[tier]
        policies[tier] = TierPolicy(
            first_response=parse_duration(entry["first_response"], business_day=business_day)
            if "first_response" in entry
            else default.first_response,
            resolution=parse_duration(entry["resolution"], business_day=business_day)
            if "resolution" in entry
            else default.resolution,
        )
    return policies


def calendar_from_config(config: Mapping[str, Any]) -> BusinessCalendar:
    """A calendar from `start`, `end` ("08:00"), `workdays` ([0..6] or "mon".."sun"),
    `holidays` (ISO dates; replaces the default list) and `timezone`."""
    unknown = set(config) - {"start", "end", "workdays", "holidays", "timezone"}
    if unknown:
        raise ValueError(f"unknown calendar keys: {', '.join(sorted(unknown))}")
    defaults = BusinessCalendar()
    return BusinessCalendar(
        tz=str(config.get("timezone", defaults.tz)),
        start=_parse_time(config["start"]) if "start" in config else defaults.start,
        end=_parse_time(config["end"]) if "end" in config else defaults.end,
        workdays=_parse_workdays(config["workdays"]) if "workdays" in config else defaults.workdays,
        holidays=_parse_holidays(config["holidays"]) if "holidays" in config else defaults.holidays,
    )


def _on(day: date, wall: time) -> datetime:
    return datetime.combine(day, wall)


def _parse_time(value: str | time) -> time:
    if isinstance(value, time):
        return value
    return time.fromisoformat(str(value))


def _parse_workdays(values: Iterable[int | str]) -> frozenset[int]:
    days: set[int] = set()
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            days.add(value)
        elif isinstance(value, str) and value[:3].lower() in WEEKDAYS:
            days.add(WEEKDAYS.index(value[:3].lower()))
        else:
            raise ValueError(f"not a weekday: {value!r} (use 0–6 or mon..sun)")
    return frozenset(days)


def _parse_holidays(values: Iterable[str | date]) -> frozenset[date]:
    return frozenset(
        value if isinstance(value, date) else date.fromisoformat(str(value)) for value in values
    )
