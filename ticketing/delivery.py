"""When a reply that could not be sent is tried again: a decision on its own, with no I/O."""

from __future__ import annotations

# The pause after the first failed try; it doubles with each further one, up to the cap.
FIRST_PAUSE_SECONDS = 5
MAX_PAUSE_SECONDS = 600


def backoff_seconds(attempt: int) -> float:
    """5 s, 10 s, 20 s ... capped at 10 minutes; `attempt` counts the tries before this one."""
    return float(min(FIRST_PAUSE_SECONDS * 2**attempt, MAX_PAUSE_SECONDS))


def next_try(
    *, permanent: bool, attempt: int, max_attempts: int, retry_after: float | None = None
) -> float | None:
    """Seconds until a failed send is tried again, or None when the reply has failed for good.

    A permanent refusal (SMTP 5xx, a 4xx of an API) is never retried; a temporary one is,
    until `max_attempts` tries were made, after the provider's own wait when it named one
    (Retry-After, a flood wait), else after the back-off.
    """
    if permanent or attempt + 1 >= max_attempts:
        return None
    return retry_after if retry_after is not None else backoff_seconds(attempt)
