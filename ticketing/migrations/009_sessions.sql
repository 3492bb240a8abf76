-- Sessions end with a password change: found by agent, and the change is dated.

ALTER TABLE agents ADD COLUMN password_changed_at timestamptz;
CREATE INDEX agent_sessions_agent ON agent_sessions (agent_id);
