-- queue_stats: the gauges, in one statement, at a cost that does not grow
-- with the backlog: no part of it reads every pending row. Only the
-- instance doing the maintenance runs it (src/election.rs), every
-- metrics.refresh_interval; `outboxd status` too.
--
-- heads: the first entry of each endpoint in events_endpoint_pending
-- (company_id, event_type, next_attempt_at, id), found by skipping from one
-- endpoint to the next (one index descent each, with one heap fetch for
-- created_at): per endpoint with pending events, the one due soonest, which
-- tells whether it has anything due now and, if so, since when. The cost
-- follows the endpoints with pending events, not their events: at
-- 1,000,000 pending events over 1,000 endpoints, docs/BENCHMARKS.md.
--
-- Held and due apart (what pages and what does not): an endpoint is held
-- while its circuit is not closed (open, half-open, paused by an operator)
-- or a Retry-After pauses it; `held` below lists them, a few rows of
-- outbox.endpoint_circuits. Its pending events wait on purpose, for its
-- company's receiver or for an operator, so they are counted on their own
-- (held, oldest_held_age_ms, endpoints_held) and left out of
-- oldest_due_age_ms, the age the paging alert reads: one tenant's outage
-- must not look like outboxd falling behind. A leased row whose lease ran
-- out is due whatever its endpoint: it waits for an instance to put it
-- back, not for the receiver.
--
-- The ages: oldest_due_age_ms is the age since enqueue of the oldest of
-- the events that have been due the longest on their endpoint (the heads
-- that are due), among endpoints not held; oldest_held_age_ms the same
-- among held ones. When nothing is stuck a retry that has just come due may
-- be the one (its enqueue was long ago), for as long as it takes a claim to
-- take it, seconds: the paging alert waits 5 minutes. The ages are
-- computed outside the aggregates so that a created_at of '-infinity' (as
-- old as can be) or 'infinity' (new), which a row written by hand may carry
-- and which cannot be subtracted, does not fail the query. Nothing due
-- (NULL) gives 0.
--
-- Retries set for later wait as `scheduled` (migration 0013) and count
-- among the pending events (both are waiting). One come due but not yet
-- moved back to pending by a claim (which does so at once while any
-- instance claims) counts as due from its enqueue: if no instance claims,
-- it pages like any event.
--
-- The counts: pending (and scheduled) and held are counted exactly up to
-- 10,000 each (an index range read up to there and no further). Past that, pending is PostgreSQL's
-- own estimate of events_endpoint_pending's entries (its tuples per page at
-- the last VACUUM or ANALYZE times its pages now, never below what was
-- counted), and held stays at 10,000, meaning that many or more. Leased rows
-- (in flight, or whose lease ran out) are few and counted whole from
-- events_lease_expiry.
--
-- The circuits: endpoints by state (closed counts every configured endpoint
-- whose circuit is not open, half-open or paused, so one held only by a
-- Retry-After counts as closed there), the held endpoints with an event due
-- now, and how long the longest-open circuit has been open (operator pauses
-- left out: they are meant).
WITH RECURSIVE held AS (
    SELECT ci.company_id, ci.event_type, ci.state, ci.manual, ci.opened_at
      FROM outbox.endpoint_circuits AS ci
     WHERE ci.state <> 'closed' OR ci.paused_until > now()
), heads AS (
    (SELECT e.company_id, e.event_type, e.next_attempt_at, e.created_at
       FROM outbox.events AS e
      WHERE e.state = 'pending'
      ORDER BY e.company_id, e.event_type, e.next_attempt_at
      LIMIT 1)
    UNION ALL
    SELECT n.company_id, n.event_type, n.next_attempt_at, n.created_at
      FROM heads AS h
     CROSS JOIN LATERAL (
           SELECT e.company_id, e.event_type, e.next_attempt_at, e.created_at
             FROM outbox.events AS e
            WHERE e.state = 'pending'
              AND (e.company_id, e.event_type) > (h.company_id, h.event_type)
            ORDER BY e.company_id, e.event_type, e.next_attempt_at
            LIMIT 1) AS n
), due AS (
    SELECT count(*) FILTER (WHERE h.company_id IS NOT NULL) AS endpoints_held,
           min(d.created_at) FILTER (WHERE h.company_id IS NULL) AS oldest_due,
           min(d.created_at) FILTER (WHERE h.company_id IS NOT NULL) AS oldest_held
      FROM heads AS d
      LEFT JOIN held AS h
             ON h.company_id = d.company_id AND h.event_type = d.event_type
     WHERE d.next_attempt_at <= now()
), scheduled_due AS (
    -- The scheduled retry due soonest, if it is due now (events_scheduled).
    SELECT s.created_at AS oldest_due
      FROM (SELECT e.created_at, e.next_attempt_at
              FROM outbox.events AS e
             WHERE e.state = 'scheduled'
             ORDER BY e.next_attempt_at
             LIMIT 1) AS s
     WHERE s.next_attempt_at <= now()
), counted AS (
    SELECT (SELECT count(*) FROM (
                SELECT 1 FROM outbox.events AS e
                 WHERE e.state = 'scheduled'
                 ORDER BY e.next_attempt_at
                 LIMIT 10001) AS s) AS scheduled,
           (SELECT count(*) FROM (
                SELECT 1 FROM outbox.events AS e
                 WHERE e.state = 'pending'
                 ORDER BY e.company_id, e.event_type, e.next_attempt_at
                 LIMIT 10001) AS p) AS pending,
           (SELECT count(*) FROM (
                SELECT 1 FROM held AS h
                 CROSS JOIN LATERAL (
                       SELECT 1 FROM outbox.events AS e
                        WHERE e.company_id = h.company_id AND e.event_type = h.event_type
                          AND e.state = 'pending'
                        LIMIT 10000) AS x
                 LIMIT 10000) AS p) AS held,
           (SELECT c.reltuples / greatest(c.relpages, 1)
                   * (pg_relation_size(c.oid) / current_setting('block_size')::bigint)
              FROM pg_class AS c
             WHERE c.oid = to_regclass('outbox.events_endpoint_pending')
               AND c.reltuples >= 0) AS estimate
), leased AS (
    -- Leased and due: a lease that ran out, not yet put back.
    SELECT count(*) AS leased,
           min(created_at) FILTER (WHERE next_attempt_at <= now()) AS oldest_due
      FROM outbox.events WHERE state = 'leased'
)
SELECT CASE WHEN n.pending <= 10000 THEN n.pending
            ELSE greatest(n.pending, coalesce(n.estimate, 0)::bigint) END
       + n.scheduled AS pending,
       l.leased,
       CASE WHEN isfinite(q.oldest_due) THEN (extract(epoch FROM now() - q.oldest_due) * 1000)::bigint
            WHEN q.oldest_due < now() THEN 9223372036854775807
            ELSE 0 END AS oldest_due_age_ms,
       (SELECT count(*) FROM outbox.emails WHERE state IN ('pending', 'sending'))
     + (SELECT count(*) FROM outbox.notifications WHERE email_id IS NULL) AS emails_queued,
       c.open, c.half_open, c.paused,
       greatest((SELECT count(*) FROM outbox.endpoints) - c.open - c.half_open - c.paused, 0) AS closed,
       n.held,
       CASE WHEN isfinite(q.oldest_held) THEN (extract(epoch FROM now() - q.oldest_held) * 1000)::bigint
            WHEN q.oldest_held < now() THEN 9223372036854775807
            ELSE 0 END AS oldest_held_age_ms,
       q.endpoints_held, c.longest_open_ms
  FROM counted AS n, leased AS l,
       -- least() skips NULLs: the older of the two, or NULL if neither.
       (SELECT least(d.oldest_due, l.oldest_due,
                     (SELECT sd.oldest_due FROM scheduled_due AS sd)) AS oldest_due,
               d.oldest_held, d.endpoints_held
          FROM due AS d, leased AS l) AS q,
       (SELECT count(*) FILTER (WHERE h.state = 'open' AND NOT h.manual) AS open,
               count(*) FILTER (WHERE h.state = 'half_open' AND NOT h.manual) AS half_open,
               count(*) FILTER (WHERE h.manual) AS paused,
               coalesce(max((extract(epoch FROM now() - h.opened_at) * 1000)::bigint)
                            FILTER (WHERE NOT h.manual AND h.state <> 'closed'), 0) AS longest_open_ms
          FROM held AS h) AS c
