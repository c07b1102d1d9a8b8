-- queue_stats: the gauges, in one statement. Every part reads only a partial
-- index of rows still in flight (events_pending_due, events_lease_expiry,
-- emails_due, notifications_waiting) or the circuits, so the cost follows
-- the backlog, not the history. Pending and leased rows are read apart,
-- each from its own index (no index holds both).
--
-- Held and due apart (what pages and what does not): an endpoint is held
-- while its circuit is not closed (open, half-open, paused by an operator)
-- or a Retry-After pauses it; `held` below lists them, a few rows of
-- outbox.endpoint_circuits. Its pending events wait on purpose, for its
-- company's receiver or for an operator, so they are counted on their own
-- (held, oldest_held_age_ms, endpoints_held) and left out of
-- oldest_due_age_ms, the age the paging alert reads: one tenant's outage
-- must not look like outboxd falling behind. The one pass over the pending
-- rows that the counts need anyway tells the two apart, each row looked up
-- in a hash of the held endpoints. A leased row whose lease ran out is due
-- whatever its endpoint: it waits for an instance to put it back, not for
-- the receiver.
--
-- The ages are computed outside the aggregates so that a created_at of
-- '-infinity' (as old as can be) or 'infinity' (new), which a row written by
-- hand may carry and which cannot be subtracted, does not fail the query.
-- Nothing due (NULL) gives 0.
--
-- The circuits: endpoints by state (closed counts every configured endpoint
-- whose circuit is not open, half-open or paused, so one held only by a
-- Retry-After counts as closed there), the held endpoints with an event due
-- now, and how long the longest-open circuit has been open (operator pauses
-- left out: they are meant).
WITH held AS NOT MATERIALIZED (
    SELECT ci.company_id, ci.event_type, ci.state, ci.manual, ci.opened_at
      FROM outbox.endpoint_circuits AS ci
     WHERE ci.state <> 'closed' OR ci.paused_until > now()
)
SELECT q.pending, q.leased,
       CASE WHEN isfinite(q.oldest_due) THEN (extract(epoch FROM now() - q.oldest_due) * 1000)::bigint
            WHEN q.oldest_due < now() THEN 9223372036854775807
            ELSE 0 END AS oldest_due_age_ms,
       q.emails_queued,
       c.open, c.half_open, c.paused,
       greatest((SELECT count(*) FROM outbox.endpoints) - c.open - c.half_open - c.paused, 0) AS closed,
       q.held,
       CASE WHEN isfinite(q.oldest_held) THEN (extract(epoch FROM now() - q.oldest_held) * 1000)::bigint
            WHEN q.oldest_held < now() THEN 9223372036854775807
            ELSE 0 END AS oldest_held_age_ms,
       c.endpoints_held, c.longest_open_ms
  FROM (SELECT p.pending, l.leased, p.held, p.oldest_held,
               -- least() skips NULLs: the older of the two, or NULL if neither.
               least(p.oldest_due, l.oldest_due) AS oldest_due,
               (SELECT count(*) FROM outbox.emails WHERE state IN ('pending', 'sending'))
             + (SELECT count(*) FROM outbox.notifications WHERE email_id IS NULL) AS emails_queued
          FROM (SELECT count(*) AS pending,
                       count(*) FILTER (WHERE h.company_id IS NOT NULL) AS held,
                       min(e.created_at) FILTER (WHERE e.next_attempt_at <= now()
                                                   AND h.company_id IS NULL) AS oldest_due,
                       min(e.created_at) FILTER (WHERE e.next_attempt_at <= now()
                                                   AND h.company_id IS NOT NULL) AS oldest_held
                  FROM outbox.events AS e
                  LEFT JOIN held AS h
                         ON h.company_id = e.company_id AND h.event_type = e.event_type
                 WHERE e.state = 'pending') AS p,
               -- Leased and due: a lease that ran out, not yet put back.
               (SELECT count(*) AS leased,
                       min(created_at) FILTER (WHERE next_attempt_at <= now()) AS oldest_due
                  FROM outbox.events WHERE state = 'leased') AS l) AS q,
       (SELECT count(*) FILTER (WHERE h.state = 'open' AND NOT h.manual) AS open,
               count(*) FILTER (WHERE h.state = 'half_open' AND NOT h.manual) AS half_open,
               count(*) FILTER (WHERE h.manual) AS paused,
               -- One step of events_endpoint_pending per held endpoint.
               count(*) FILTER (WHERE EXISTS (
                   SELECT 1 FROM outbox.events AS e
                    WHERE e.company_id = h.company_id AND e.event_type = h.event_type
                      AND e.state = 'pending' AND e.next_attempt_at <= now())) AS endpoints_held,
               coalesce(max((extract(epoch FROM now() - h.opened_at) * 1000)::bigint)
                            FILTER (WHERE NOT h.manual AND h.state <> 'closed'), 0) AS longest_open_ms
          FROM held AS h) AS c
