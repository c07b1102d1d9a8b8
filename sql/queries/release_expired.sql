-- release_expired: put back in the queue up to $1 events whose lease ran out
-- (their daemon died mid-delivery, or could not record the outcome within
-- the lease). Returns how many.
--
-- Each becomes pending again and due at once: next_attempt_at stays the end
-- of its lease, so the events come back in the order their leases ran out.
-- lease_owner and attempts are kept. A late outcome of that attempt still
-- counts until the next claim (record.sql's fence is the owner and the
-- attempt number), and the claim that takes the row knows that it takes
-- over a lease that ran out (the leases-expired counter).
--
-- The claims read pending rows only (events_pending_due,
-- events_endpoint_pending), so this is how such a row gets back to them.
-- It reads events_lease_expiry, which holds leased rows only: the few in
-- flight, and those that ran out. Every instance runs it; SKIP LOCKED keeps
-- them apart, and a row whose owner is writing its outcome right now is
-- left to that.
WITH expired AS (
    SELECT e.id
      FROM outbox.events AS e
     WHERE e.state = 'leased'
       AND e.next_attempt_at <= now()
     ORDER BY e.next_attempt_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), released AS (
    UPDATE outbox.events AS e
       SET state = 'pending'
      FROM expired
     WHERE e.id = expired.id
 RETURNING 1
)
SELECT count(*) AS released FROM released
