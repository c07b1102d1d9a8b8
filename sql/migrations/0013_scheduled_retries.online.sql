-- 0013, online: the retries set for later, soonest first. Only outboxd
-- writes these rows (a failed attempt's retry), never the enqueue; the
-- claim reads the head of this index to move those come due to `pending`.
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_scheduled
    ON outbox.events (next_attempt_at)
    WHERE state = 'scheduled';
