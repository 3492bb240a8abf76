"""Delivery checker: every external id sent in is in the database exactly once, and so is every reply sent out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import db


@dataclass
class Tally:
    """What the database holds for a set of sent ids."""

    sent: int
    stored: int
    missing: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)  # id -> rows (or events) holding it
    unexpected: list[str] = field(default_factory=list)  # in the database, never sent

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated and not self.unexpected

    def summary(self) -> str:
        return (
            f"sent {self.sent}, stored {self.stored}, lost {len(self.missing)}, "
            f"duplicated {len(self.duplicated)}, unexpected {len(self.unexpected)}"
            + (f"; first lost {self.missing[:5]}" if self.missing else "")
            + (f"; first duplicated {list(self.duplicated.items())[:5]}" if self.duplicated else "")
        )


def check_inbound(
    pg_url: str, channel: str, account: str, sent: Iterable[str], *, prefix: str | None = None
) -> Tally:
    """Compare sent external ids with inbound `messages` rows and their `message` events.

    A message counts twice when two rows carry its id or when its ticket log records it
    more than once (a batch applied twice would show there even with the unique index).
    `prefix` limits the "unexpected" search to ids this run could have produced.
    """
    wanted = list(sent)
    rows = db.fetch(
        pg_url,
        "SELECT m.external_id, count(DISTINCT m.id) AS rows,"
        " count(e.id) AS events FROM messages m"
        " LEFT JOIN ticket_events e ON e.ticket_id = m.ticket_id AND e.kind = 'message'"
        "  AND (e.data->>'message_id')::bigint = m.id"
        " WHERE m.direction = 'in' AND m.channel = $1 AND m.account = $2"
        "  AND m.external_id = ANY($3::text[])"
        " GROUP BY m.external_id",
        channel, account, wanted,
    )  # fmt: skip
    found = {r["external_id"]: max(r["rows"], r["events"]) for r in rows}
    tally = Tally(sent=len(wanted), stored=sum(found.values()))
    repeats = Counter(wanted)
    tally.missing = [ext for ext in repeats if ext not in found]
    tally.duplicated = {ext: n for ext, n in found.items() if n != 1}
    if prefix is not None:
        extra = db.fetch(
            pg_url,
            "SELECT external_id FROM messages WHERE direction = 'in' AND channel = $1"
            " AND account = $2 AND external_id LIKE $3 AND NOT external_id = ANY($4::text[])",
            channel, account, prefix + "%", wanted,
        )  # fmt: skip
        tally.unexpected = [r["external_id"] for r in extra]
    return tally


def check_delivered(expected: Iterable[str], delivered: Iterable[str]) -> Tally:
    """Compare the idempotency keys of replies we asked for with what the provider received."""
    wanted = list(expected)
    seen = Counter(delivered)
    tally = Tally(sent=len(wanted), stored=sum(seen[k] for k in wanted))
    tally.missing = [k for k in wanted if seen[k] == 0]
    tally.duplicated = {k: n for k, n in seen.items() if n > 1}
    tally.unexpected = [k for k in seen if k not in set(wanted)]
    return tally
