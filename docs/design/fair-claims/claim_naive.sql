-- claim_naive (scenario B): today's claim plus a NOT EXISTS filter on held endpoints.
-- claim: lease up to :lim due events to the instance named $2 for $3 milliseconds,
-- and return each with its endpoint settings.
--
-- Due: pending with next_attempt_at reached, or leased with the lease run out
-- (its daemon died mid-delivery). The partial index events_due serves the
-- ORDER BY ... LIMIT, and SKIP LOCKED lets several daemons claim side by side
-- without queueing behind each other's row locks. Claiming increments
-- `attempts`, which fences every later update of this delivery (record.sql).
-- The statement commits on its own, before any HTTP request is made.
WITH due AS (
    SELECT id, state = 'leased' AS lease_expired
      FROM outbox.events
     WHERE state IN ('pending', 'leased')
       AND next_attempt_at <= now()
       -- naive issue-13 filter: skip events of held endpoints (breaker open / at cap)
       AND NOT EXISTS (SELECT 1 FROM outbox.held_endpoints h
                        WHERE h.company_id = events.company_id AND h.event_type = events.event_type)
     ORDER BY next_attempt_at
     LIMIT :lim
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE outbox.events AS e
       SET state = 'leased',
           attempts = e.attempts + 1,
           lease_owner = 'bench-1',
           next_attempt_at = now() + 30000::bigint * interval '1 millisecond'
      FROM due
     WHERE e.id = due.id
 RETURNING e.id, e.event_type, e.company_id, e.payload::text AS payload, e.attempts,
           e.attempts - e.attempts_at_replay AS attempts_since_replay,
           -- The retry policy's clock starts at the last replay, if any.
           -- timestamptz also holds 'infinity' and '-infinity' (a row written
           -- by hand or restored may carry them), which cannot be subtracted:
           -- an error here would fail every claim and stall the whole queue.
           -- '-infinity' counts as older than anything, 'infinity' as new.
           CASE WHEN isfinite(coalesce(e.replayed_at, e.created_at))
                THEN (extract(epoch FROM now() - coalesce(e.replayed_at, e.created_at)) * 1000)::bigint
                WHEN coalesce(e.replayed_at, e.created_at) < now() THEN 9223372036854775807
                ELSE 0 END AS age_ms,
           due.lease_expired
)
SELECT c.id, c.event_type, c.company_id, c.payload, c.attempts, c.attempts_since_replay,
       c.age_ms, c.lease_expired,
       ep.url, ep.auth_type, ep.username, ep.password, ep.token, ep.enabled
  FROM claimed AS c
  LEFT JOIN outbox.endpoints AS ep
         ON ep.company_id = c.company_id AND ep.event_type = c.event_type
