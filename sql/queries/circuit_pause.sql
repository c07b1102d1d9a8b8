-- circuit_pause: an operator opens an endpoint's circuit by hand
-- (`outboxd endpoint pause`): its events are held, with no probe, until
-- `outboxd endpoint reset`; `circuit.max_hold` still fails them in the end.
--
--  $1 bigint  company
--  $2 text    event type
INSERT INTO outbox.endpoint_circuits AS c
       (company_id, event_type, state, opened_at, retry_at, manual, last_error, changed_at)
VALUES ($1, $2, 'open', now(), 'infinity', true, 'paused by an operator', now())
ON CONFLICT (company_id, event_type) DO UPDATE
   SET state = 'open', opened_at = coalesce(c.opened_at, now()), retry_at = 'infinity',
       manual = true, last_error = 'paused by an operator', changed_at = now()
