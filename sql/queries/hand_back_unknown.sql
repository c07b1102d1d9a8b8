-- hand_back_unknown: after a claim whose result this instance does not know
-- (an error, no answer in time, the connection lost on the way: it may have
-- committed with its reply lost, on a primary that failed and on the
-- synchronous standby promoted after it), put back in the queue every event
-- leased to this instance ($1) that it does not know of: neither in flight
-- nor awaiting its record, which are the ids $2 at the attempt numbers $3.
-- The claim loop runs it before its next claim, and again until it
-- succeeds (it is harmless to repeat). Returns how many.
--
-- Nothing of these events was sent (a claim's rows are used only once its
-- COMMIT has answered), so they need not wait out their lease (60 s by
-- default) and the lease expiry's round: each becomes pending and due at
-- once. attempts is kept; lease_owner is cleared, as hand_back.sql clears
-- it: nothing was sent, so no outcome can come, and the next claim must not
-- count the row as a lease that ran out.
--
-- Fenced by the owner (a lease another instance holds is never touched) and
-- by the known leases (a delivery of this instance in flight, or an outcome
-- waiting to be written, keeps its lease). It reads events_lease_expiry,
-- which holds leased rows only.
WITH handed AS (
    UPDATE outbox.events AS e
       SET state = 'pending',
           lease_owner = NULL,
           next_attempt_at = now()
     WHERE e.state = 'leased'
       AND e.lease_owner = $1
       AND NOT EXISTS (SELECT 1
                         FROM unnest($2::uuid[], $3::int[]) AS k(id, attempt)
                        WHERE k.id = e.id AND k.attempt = e.attempts)
 RETURNING 1
)
SELECT count(*) AS handed_back FROM handed
