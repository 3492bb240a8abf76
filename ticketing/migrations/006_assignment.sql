-- Tickets are taken by (assigned to) an agent (tickets.assignee_id); the queue filters on it.
CREATE INDEX tickets_assignee ON tickets (assignee_id) WHERE status <> 'closed';
