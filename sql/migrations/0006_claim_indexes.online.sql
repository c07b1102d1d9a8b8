-- 0006, online: the claims' indexes, pending and leased rows apart (see
-- 0006_claim_indexes.sql for why). Built first, with CREATE INDEX
-- CONCURRENTLY, then the two they replace are dropped with DROP INDEX
-- CONCURRENTLY: neither blocks the sales application's writes, and the
-- claims have an index to walk at every step.

-- Pending rows, oldest due first: the plain claim stops after its LIMIT.
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_pending_due
    ON outbox.events (next_attempt_at)
    WHERE state = 'pending';

-- Pending rows grouped by endpoint, each endpoint's oldest first: the fair
-- claim skips from one endpoint to the next in one index descent each, so
-- an endpoint's backlog costs one step, however long it is. The id makes
-- every entry's position unique, so the claim can read an endpoint's rows
-- from its head onwards without walking again the entries of rows claimed
-- since the last vacuum, which sort before it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_endpoint_pending
    ON outbox.events (company_id, event_type, next_attempt_at, id)
    WHERE state = 'pending';

-- Leased rows by the end of their lease: the few in flight, and those
-- whose daemon died, which release_expired.sql puts back in the queue.
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_lease_expiry
    ON outbox.events (next_attempt_at)
    WHERE state = 'leased';

DROP INDEX CONCURRENTLY IF EXISTS outbox.events_endpoint_due;

DROP INDEX CONCURRENTLY IF EXISTS outbox.events_due;
