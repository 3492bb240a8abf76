-- When a message row was written, for end-to-end latency (adapter accepted -> stored).
-- Added without a default first, so existing rows stay NULL and the table is not rewritten.
ALTER TABLE messages ADD COLUMN stored_at timestamptz;
ALTER TABLE messages ALTER COLUMN stored_at SET DEFAULT clock_timestamp();
