-- 0004: retention and vacuum settings.
--
-- outboxd deletes delivered events (and, by cascade, their attempt rows and
-- notifications) after retention.delivered, failed ones after
-- retention.failed, in bounded batches. These indexes let it find them
-- without scanning the table.
CREATE INDEX events_delivered_at ON outbox.events (delivered_at)
    WHERE state = 'delivered';
CREATE INDEX events_failed_since ON outbox.events ((coalesce(replayed_at, created_at)))
    WHERE state = 'failed';
CREATE INDEX emails_sent_at ON outbox.emails (sent_at)
    WHERE state = 'sent';

-- The outbox is a queue: every row is inserted, updated two or three times
-- and later deleted. The default autovacuum trigger (20% of the table
-- changed) lets dead rows pile up in a large table between runs and bloats
-- the small partial index the claim reads. Vacuum after 2% instead, and
-- analyze as often, so the planner keeps seeing how few rows are due.
ALTER TABLE outbox.events SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05
);
ALTER TABLE outbox.attempts SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);
ALTER TABLE outbox.emails SET (autovacuum_vacuum_scale_factor = 0.05);
