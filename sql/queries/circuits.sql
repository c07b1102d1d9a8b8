-- circuits: the endpoints whose circuit is not closed (open, half-open,
-- paused by an operator) or that a Retry-After holds, for `outboxd status`,
-- with what each has in flight (live leases, every instance) and waiting.
-- Each such endpoint's range of events_endpoint_pending is read, its whole
-- backlog (about 0.1 s per million rows); healthy endpoints cost nothing.
SELECT c.company_id, c.event_type, c.state, c.manual, c.opened_at,
       CASE WHEN isfinite(c.retry_at) THEN c.retry_at END AS retry_at,
       CASE WHEN c.paused_until > now() THEN c.paused_until END AS paused_until,
       c.last_error,
       (SELECT count(*) FROM outbox.events AS e
         WHERE e.company_id = c.company_id AND e.event_type = c.event_type
           AND e.state = 'leased' AND (e.next_attempt_at > now()) IS TRUE) AS in_flight,
       (SELECT count(*) FROM outbox.events AS e
         WHERE e.company_id = c.company_id AND e.event_type = c.event_type
           AND e.state = 'pending' AND e.next_attempt_at <= now()) AS waiting
  FROM outbox.endpoint_circuits AS c
 WHERE c.state <> 'closed' OR c.paused_until > now()
 ORDER BY c.opened_at NULLS LAST, c.company_id, c.event_type
