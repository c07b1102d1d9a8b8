-- event_attempts: every delivery attempt of one event, oldest first,
-- including those from before a replay.
--
--  $1 uuid  event id
SELECT attempt, started_at, duration_ms, http_status, outcome, message, lease_owner
  FROM outbox.attempts
 WHERE event_id = $1
 ORDER BY attempt
