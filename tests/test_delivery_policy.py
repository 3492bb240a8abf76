"""The delivery retry policy, a pure decision."""

from __future__ import annotations

import pytest

from ticketing.delivery import backoff_seconds, next_try


def test_backoff_doubles_from_five_seconds_up_to_ten_minutes() -> None:
    assert [backoff_seconds(n) for n in range(9)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]


def test_a_permanent_refusal_is_never_retried() -> None:
    assert next_try(permanent=True, attempt=0, max_attempts=8) is None
    assert next_try(permanent=True, attempt=0, max_attempts=8, retry_after=30) is None


@pytest.mark.parametrize(("attempt", "expected"), [(0, 5.0), (1, 10.0), (6, 320.0), (7, None)])
def test_a_temporary_failure_is_retried_until_the_attempts_are_spent(
    attempt: int, expected: float | None
) -> None:
    assert next_try(permanent=False, attempt=attempt, max_attempts=8) == expected


def test_the_providers_own_wait_comes_first() -> None:
    assert next_try(permanent=False, attempt=3, max_attempts=8, retry_after=2.5) == 2.5
    assert next_try(permanent=False, attempt=7, max_attempts=8, retry_after=2.5) is None
