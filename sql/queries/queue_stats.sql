-- queue_stats: the gauges, in one statement. Every part reads only a partial
-- index of rows still in flight (events_pending_due, events_lease_expiry,
-- emails_due, notifications_waiting), so the cost follows the backlog, not
-- the history. Pending and leased rows are read apart, each from its own
-- index (no index holds both).
--
-- The age is computed outside the aggregate so that a created_at of
-- '-infinity' (as old as can be) or 'infinity' (new), which a row written by
-- hand may carry and which cannot be subtracted, does not fail the query.
-- Nothing due (NULL) gives 0.
--
-- The circuits: endpoints by state (closed counts every configured endpoint
-- whose circuit is not open, half-open or paused), the events they hold
-- (pending, of an endpoint that is not closed or that a Retry-After
-- pauses), and how long the longest-open circuit has been open (operator
-- pauses left out: they are meant).
SELECT q.pending, q.leased,
       CASE WHEN isfinite(q.oldest_due) THEN (extract(epoch FROM now() - q.oldest_due) * 1000)::bigint
            WHEN q.oldest_due < now() THEN 9223372036854775807
            ELSE 0 END AS oldest_due_age_ms,
       q.emails_queued,
       c.open, c.half_open, c.paused,
       greatest((SELECT count(*) FROM outbox.endpoints) - c.open - c.half_open - c.paused, 0) AS closed,
       c.held, c.longest_open_ms
  FROM (SELECT p.pending, l.leased,
               -- least() skips NULLs: the older of the two, or NULL if neither.
               least(p.oldest_due, l.oldest_due) AS oldest_due,
               (SELECT count(*) FROM outbox.emails WHERE state IN ('pending', 'sending'))
             + (SELECT count(*) FROM outbox.notifications WHERE email_id IS NULL) AS emails_queued
          FROM (SELECT count(*) AS pending,
                       min(created_at) FILTER (WHERE next_attempt_at <= now()) AS oldest_due
                  FROM outbox.events WHERE state = 'pending') AS p,
               -- Leased and due: a lease that ran out, not yet put back.
               (SELECT count(*) AS leased,
                       min(created_at) FILTER (WHERE next_attempt_at <= now()) AS oldest_due
                  FROM outbox.events WHERE state = 'leased') AS l) AS q,
       (SELECT count(*) FILTER (WHERE state = 'open' AND NOT manual) AS open,
               count(*) FILTER (WHERE state = 'half_open' AND NOT manual) AS half_open,
               count(*) FILTER (WHERE manual) AS paused,
               coalesce(sum((SELECT count(*) FROM outbox.events AS e
                              WHERE e.company_id = ci.company_id AND e.event_type = ci.event_type
                                AND e.state = 'pending')), 0)::bigint AS held,
               coalesce(max((extract(epoch FROM now() - ci.opened_at) * 1000)::bigint)
                            FILTER (WHERE NOT manual AND state <> 'closed'), 0) AS longest_open_ms
          FROM outbox.endpoint_circuits AS ci
         WHERE ci.state <> 'closed' OR ci.paused_until > now()) AS c
