-- 0009, online: a company's settled events in an index of their own.
--
-- events_company_created held every event by company, so every enqueue,
-- every claim and every retry wrote an entry into it (an update that moves
-- a row writes a new entry into each index whose rows it stays in). The
-- events still in flight are found by company in the claims' own indexes
-- (events_endpoint_pending, events_lease_expiry); this one now holds only
-- the delivered and failed ones, an entry each when the row settles. An
-- enqueue so writes three index entries, not four.
--
-- Built with CREATE INDEX CONCURRENTLY, then the old one dropped with DROP
-- INDEX CONCURRENTLY: neither blocks the sales application's writes.

-- The history of one company, newest first (`outboxd events list
-- --company`, a settings screen's log), and its failed events
-- (`outboxd events retry --company`).
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_company_settled
    ON outbox.events (company_id, created_at)
    WHERE state IN ('delivered', 'failed');

DROP INDEX CONCURRENTLY IF EXISTS outbox.events_company_created;
