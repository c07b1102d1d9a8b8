-- event: one event with every column, for `outboxd events show`.
--
--  $1 uuid  event id
SELECT id, event_type, company_id, payload, state, attempts, next_attempt_at,
       lease_owner, created_at, delivered_at, response_message, last_error,
       replayed_at, attempts_at_replay
  FROM outbox.events
 WHERE id = $1
