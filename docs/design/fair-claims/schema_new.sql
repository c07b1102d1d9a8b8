-- Candidate migration 0005 (research only): per-endpoint due index + held-endpoint model.
CREATE INDEX IF NOT EXISTS events_endpoint_due ON outbox.events (company_id, event_type, next_attempt_at)
    WHERE state IN ('pending', 'leased');
-- Model of "held" endpoints (circuit breaker open or paused); in the daemon this could equally be a $param array.
CREATE TABLE IF NOT EXISTS outbox.held_endpoints (
    company_id bigint NOT NULL,
    event_type text   NOT NULL,
    PRIMARY KEY (company_id, event_type));
-- In-flight rows per endpoint, for the cap: holds only leased rows, so enqueue (pending rows) never inserts into it.
CREATE INDEX IF NOT EXISTS events_leased ON outbox.events (company_id, event_type) WHERE state = 'leased';
