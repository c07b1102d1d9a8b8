-- record: write the outcomes of a group of finished deliveries in one round
-- trip, log one attempt row each, and queue an error notification for each
-- event that failed for good, in the same transaction as its marking.
--
-- Every event update is fenced: it applies only while the row is still leased
-- at the attempt number this delivery claimed. If the lease ran out and
-- another instance claimed the event again (attempts moved on), this outcome
-- is discarded rather than overwriting the newer one, so an event is marked
-- delivered or failed exactly once. The ids that were marked (or had been,
-- by an earlier try of this same group) are returned.
--
--  $1 uuid[]        event ids
--  $2 int[]         attempt numbers (the fence)
--  $3 text[]        new state: delivered | failed | pending (retry)
--  $4 bigint[]      retry delay in ms, for pending
--  $5 text[]        what the external system said (NULL: nothing new)
--  $6 text[]        last_error (NULL when delivered)
--  $7 timestamptz[] attempt start
--  $8 int[]         attempt duration in ms
--  $9 smallint[]    HTTP status (NULL: no answer)
-- $10 text[]        attempt outcome: success | rejected | retryable | permanent | no_endpoint
-- $11 text[]        attempt message: the external message, else the error
-- $12 text          this instance's name
-- $13 bool[]        notify the endpoint's notify_emails (it failed for good after a real attempt)
-- $14 bool          this group was sent before and its reply lost (see the end)
-- $15 bigint[]      Retry-After of a 429 or 503 in ms: pause the whole endpoint (NULL: no)
-- $16 int           [circuit] open_after
-- $17 bigint        [circuit] cooldown in ms
-- $18 bigint        [circuit] max_cooldown in ms
-- $19 bigint        notify.window in ms (throttles the circuit emails)
--
-- Returns (id, NULL, NULL, NULL) per marked event, then (NULL, company_id,
-- event_type, change) per endpoint whose circuit changed: opened, reopened
-- or closed.
WITH outcome AS (
    SELECT *
      FROM unnest($1::uuid[], $2::int[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                  $7::timestamptz[], $8::int[], $9::smallint[], $10::text[], $11::text[],
                  $13::bool[], $15::bigint[])
           AS o(id, attempt, state, retry_in_ms, response_message, last_error,
                started_at, duration_ms, http_status, attempt_outcome, attempt_message,
                notify, pause_ms)
), marked AS (
    UPDATE outbox.events AS e
       SET state = o.state,
           lease_owner = NULL,
           next_attempt_at = CASE WHEN o.state = 'pending'
                                  THEN now() + o.retry_in_ms * interval '1 millisecond'
                                  ELSE e.next_attempt_at END,
           delivered_at = CASE WHEN o.state = 'delivered' THEN now() END,
           response_message = CASE WHEN o.state = 'delivered' OR o.response_message IS NOT NULL
                                   THEN o.response_message
                                   ELSE e.response_message END,
           last_error = o.last_error
      FROM outcome AS o
     WHERE e.id = o.id
       -- The fence: still leased by this instance at the attempt number it
       -- claimed. lease_owner is set exactly while a row is leased, so this
       -- is "state = 'leased'" without naming state: a condition on state
       -- would let the planner answer it from the events_due partial index,
       -- which it thinks tiny (few rows are leased when ANALYZE looks) but
       -- which holds the whole backlog and, until vacuum, the dead entries
       -- of every recent delivery: measured, each group's update then slowed
       -- to tens of milliseconds. Written this way it is one primary-key
       -- probe per outcome.
       AND e.lease_owner = $12
       AND e.attempts = o.attempt
 RETURNING e.id, e.attempts, e.company_id, e.event_type
), notified AS (
    INSERT INTO outbox.notifications (event_id, company_id, event_type, endpoint_url)
    SELECT m.id, m.company_id, m.event_type, ep.url
      FROM marked AS m
      JOIN outcome AS o ON o.id = m.id AND o.attempt = m.attempts
      JOIN outbox.endpoints AS ep
        ON ep.company_id = m.company_id AND ep.event_type = m.event_type
     WHERE o.notify AND cardinality(ep.notify_emails) > 0
), logged AS (
    -- Logged even when the fence refused the update: the request was made.
    INSERT INTO outbox.attempts (event_id, attempt, started_at, duration_ms, http_status,
                                 outcome, message, lease_owner)
    SELECT o.id, o.attempt, o.started_at, o.duration_ms, o.http_status,
           o.attempt_outcome, o.attempt_message, $12
      FROM outcome AS o
     WHERE EXISTS (SELECT 1 FROM outbox.events AS e WHERE e.id = o.id)
        ON CONFLICT (event_id, attempt) DO NOTHING
), touched AS (
    -- What this group says about each endpoint it delivered to.
    SELECT m.company_id, m.event_type,
           (count(*) FILTER (WHERE o.attempt_outcome = 'retryable'))::int AS failed,
           coalesce(bool_or(o.http_status IS NOT NULL AND o.attempt_outcome <> 'retryable'),
                    false) AS answered,
           max(o.pause_ms) AS pause_ms,
           (array_agg(o.last_error ORDER BY o.started_at DESC)
                FILTER (WHERE o.attempt_outcome = 'retryable'))[1] AS error
      FROM marked AS m
      JOIN outcome AS o ON o.id = m.id AND o.attempt = m.attempts
     GROUP BY m.company_id, m.event_type
), circuits AS (
    -- The circuit breakers (outbox.circuit_record, migration 0005). Only
    -- endpoints that failed, were paused, or have a circuit to clear: a
    -- healthy endpoint's successes cost one probe of a small table here and
    -- write nothing. In key order, so two instances' groups lock circuit
    -- rows in the same order and cannot deadlock.
    SELECT t.company_id, t.event_type,
           outbox.circuit_record(t.company_id, t.event_type, t.failed, t.answered,
                                 t.pause_ms, t.error, $16, $17, $18, $19) AS change
      FROM touched AS t
     WHERE t.failed > 0 OR t.pause_ms IS NOT NULL
        OR EXISTS (SELECT 1 FROM outbox.endpoint_circuits AS c
                    WHERE c.company_id = t.company_id AND c.event_type = t.event_type
                      AND (c.state <> 'closed' OR c.failures > 0) AND NOT c.manual)
     ORDER BY t.company_id, t.event_type
)
SELECT id, NULL::bigint AS company_id, NULL::text AS event_type, NULL::text AS change
  FROM marked
UNION ALL
SELECT NULL, c.company_id, c.event_type, c.change
  FROM circuits AS c
 WHERE c.change IS NOT NULL
UNION ALL
-- Already in the state this outcome sets, at this attempt: a retry of a
-- group whose commit succeeded but whose reply was lost. Not a lost lease.
-- Only looked up on such a retry ($14), not on every group.
SELECT o.id, NULL, NULL, NULL
  FROM outcome AS o
  JOIN outbox.events AS e ON e.id = o.id
 WHERE $14 AND e.attempts = o.attempt AND e.state = o.state AND e.lease_owner IS NULL
