-- 0005, built online: the index of the fair claim (sql/queries/claim_fair.sql).
--
-- `outboxd migrate` runs each statement here on its own, after 0005's
-- transaction has committed, with CREATE INDEX CONCURRENTLY: it reads the
-- table twice instead of locking it, so the sales application goes on
-- enqueueing while a large outbox is indexed. A build that was interrupted
-- leaves an invalid index behind; the next `outboxd migrate` drops and
-- rebuilds it, and until then the daemon waits ("schema incomplete").

-- One entry per event still to deliver, grouped by endpoint, each
-- endpoint's oldest first: the claim skips from one endpoint to the next in
-- one index descent each, so an endpoint's backlog costs one step, however
-- long it is. The id makes every entry's position unique, so the claim can
-- read an endpoint's rows from its head onwards without walking again the
-- entries of rows delivered since the last vacuum, which sort before it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_endpoint_due
    ON outbox.events (company_id, event_type, next_attempt_at, id)
    WHERE state IN ('pending', 'leased');
