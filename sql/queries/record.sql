-- record: write the outcomes of a group of finished deliveries in one round
-- trip, log one attempt row each, and queue an error notification for each
-- event that failed for good, in the same transaction as its marking.
--
-- Every event update is fenced: it applies only while the row still carries
-- this instance's lease at the attempt number this delivery claimed. If the
-- lease ran out and another instance claimed the event again (attempts moved
-- on), this outcome is discarded rather than overwriting the newer one, so
-- an event is marked delivered or failed exactly once. (A lease that ran out
-- and was put back in the queue by release_expired.sql keeps its owner and
-- attempt number until the next claim: a late outcome still counts until
-- then.) The ids that were marked (or had been, by an earlier try of this
-- same group) are returned. It runs in an explicit transaction, BEGIN and
-- COMMIT sent with it (src/store/txn.rs): the ids count as marked only
-- once the COMMIT has answered.
--
--  $1 uuid[]        event ids
--  $2 int[]         attempt numbers (the fence)
--  $3 text[]        new state: delivered | failed | scheduled (a retry) |
--                   pending (a probe put back held: see $15)
--  $4 bigint[]      retry delay in ms, for scheduled
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
-- $15 timestamptz[] for a probe that failed (state pending): when it was
--                   due before its claim. It goes back due then, held with
--                   its endpoint (circuit.max_hold counts from then), and
--                   the attempt is not counted against its retry budget
--                   (attempts_at_replay, the budget's start, moves up one).
WITH outcome AS (
    SELECT *
      FROM unnest($1::uuid[], $2::int[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                  $7::timestamptz[], $8::int[], $9::smallint[], $10::text[], $11::text[],
                  $13::bool[], $15::timestamptz[])
           AS o(id, attempt, state, retry_in_ms, response_message, last_error,
                started_at, duration_ms, http_status, attempt_outcome, attempt_message,
                notify, held_due_at)
), marked AS (
    UPDATE outbox.events AS e
       SET state = o.state,
           lease_owner = NULL,
           next_attempt_at = CASE WHEN o.held_due_at IS NOT NULL THEN o.held_due_at
                                  WHEN o.state = 'scheduled'
                                  THEN now() + o.retry_in_ms * interval '1 millisecond'
                                  ELSE e.next_attempt_at END,
           attempts_at_replay = e.attempts_at_replay
                                + CASE WHEN o.held_due_at IS NOT NULL THEN 1 ELSE 0 END,
           delivered_at = CASE WHEN o.state = 'delivered' THEN now() END,
           response_message = CASE WHEN o.state = 'delivered' OR o.response_message IS NOT NULL
                                   THEN o.response_message
                                   ELSE e.response_message END,
           last_error = o.last_error
      FROM outcome AS o
     WHERE e.id = o.id
       -- The fence: this instance's lease, at the attempt number it
       -- claimed. It does not name state: a condition on state would let
       -- the planner answer it from a partial index it thinks tiny (few
       -- rows are leased when ANALYZE looks) but which holds, until vacuum,
       -- the dead entries of every recent delivery (measured with the old
       -- events_due: each group's update slowed to tens of milliseconds).
       -- Written this way it is one primary-key probe per outcome.
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
)
-- `now`: marked by this statement. The circuits learn only from those
-- (store::record): news that an earlier try of this group may have applied
-- already is not applied twice.
SELECT id, true AS now FROM marked
UNION ALL
-- Already in the state this outcome sets, at this attempt: a retry of a
-- group whose commit succeeded but whose reply was lost. Not a lost lease.
-- Only looked up on such a retry ($14), not on every group.
SELECT o.id, false
  FROM outcome AS o
  JOIN outbox.events AS e ON e.id = o.id
 WHERE $14 AND e.attempts = o.attempt AND e.state = o.state AND e.lease_owner IS NULL
