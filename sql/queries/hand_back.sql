-- hand_back: at the end of a stop, put back in the queue every event still
-- leased to this instance ($1): deliveries cut off at the drain deadline
-- (their tasks are gone by then) and a claim whose events were never
-- started. Returns how many.
--
-- Each becomes pending and due at once, instead of waiting out its lease
-- (60 s by default) and the lease expiry's round: a restarted daemon, or
-- any other instance, takes it at its next claim. lease_owner and attempts
-- are kept, as release_expired.sql keeps them: the claim that takes the row
-- knows that the receiver may have it already, and the attempt counts
-- against the retry budget (it may have been received).
--
-- Fenced by the owner: a lease another instance holds is never touched.
-- It reads events_lease_expiry, which holds leased rows only.
WITH handed AS (
    UPDATE outbox.events AS e
       SET state = 'pending',
           next_attempt_at = now()
     WHERE e.state = 'leased'
       AND e.lease_owner = $1
 RETURNING 1
)
SELECT count(*) AS handed_back FROM handed
