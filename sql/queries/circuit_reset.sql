-- circuit_reset: an operator closes an endpoint's circuit
-- (`outboxd endpoint reset`), whether it opened on failures or was paused:
-- closed and clean, its events flow at once, a Retry-After pause dropped.
-- Returns the state it had.
--
--  $1 bigint  company
--  $2 text    event type
UPDATE outbox.endpoint_circuits AS c
   SET state = 'closed', failures = 0, opened_at = NULL, retry_at = NULL, cooldown_ms = 0,
       paused_until = NULL, manual = false, changed_at = now()
  FROM (SELECT company_id, event_type, state, manual FROM outbox.endpoint_circuits
         WHERE company_id = $1 AND event_type = $2 FOR UPDATE) AS before
 WHERE c.company_id = before.company_id AND c.event_type = before.event_type
RETURNING before.state, before.manual
