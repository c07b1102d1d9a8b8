-- endpoint_load: what one endpoint has in the queue, for `outboxd endpoint
-- show`: requests in flight now (live leases, every instance), events due
-- and waiting, and events scheduled for a later retry. Reads the endpoint's
-- range of events_endpoint_pending, its whole backlog, which is what it
-- counts, and the live leases of events_lease_expiry (every endpoint's,
-- a few per delivery slot).
--
--  $1 bigint  company
--  $2 text    event type
SELECT (SELECT count(*) FROM outbox.events
         WHERE company_id = $1 AND event_type = $2
           AND state = 'leased' AND next_attempt_at > now()) AS in_flight,
       count(*) FILTER (WHERE state = 'pending' AND next_attempt_at <= now()) AS waiting,
       -- `scheduled` since migration 0013 (events_scheduled: every
       -- endpoint's retries, by time); `pending` and due later before it.
       count(*) FILTER (WHERE state = 'scheduled' OR next_attempt_at > now()) AS scheduled
  FROM outbox.events
 WHERE company_id = $1 AND event_type = $2 AND state IN ('pending', 'scheduled')
