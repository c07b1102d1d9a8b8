-- hand_back: at the end of a stop, put back in the queue every event still
-- leased to this instance ($1): deliveries cut off at the drain deadline
-- (their tasks are gone by then) and a claim whose events were never
-- started. Returns how many.
--
-- Each becomes pending and due at once, instead of waiting out its lease
-- (60 s by default) and the lease expiry's round: a restarted daemon, or
-- any other instance, takes it at its next claim. attempts is kept: the
-- attempt counts against the retry budget (it may have been received).
-- lease_owner is cleared: no outcome of this instance can come any more
-- (its recorder has stopped), and a row put back with its owner would count
-- as a lease that ran out when the next claim takes it
-- (outboxd_leases_expired_total, OutboxdLeasesExpiring): a rolling deploy
-- is not an instance dying. outboxd_leases_handed_back_total counts these.
--
-- Fenced by the owner: a lease another instance holds is never touched.
-- It reads events_lease_expiry, which holds leased rows only.
WITH handed AS (
    UPDATE outbox.events AS e
       SET state = 'pending',
           lease_owner = NULL,
           next_attempt_at = now()
     WHERE e.state = 'leased'
       AND e.lease_owner = $1
 RETURNING 1
)
SELECT count(*) AS handed_back FROM handed
