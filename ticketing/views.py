"""How the API and the console read tickets: SQL fragments both build their queries from."""

from __future__ import annotations

# Whether ticket `t` is past a deadline: no first response by its due time, or not resolved
# by its resolution due time; a closed ticket never is.
OVERDUE_SQL = (
    "(t.status <> 'closed' AND (t.resolution_due < now()"
    " OR (t.first_response_at IS NULL AND t.first_response_due < now())))"
)
# The next deadline of ticket `t`: the first response while none was sent, else resolution.
NEXT_DUE_SQL = (
    "LEAST(CASE WHEN t.first_response_at IS NULL THEN t.first_response_due END, t.resolution_due)"
)
