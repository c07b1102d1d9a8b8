-- claim_fair (scenario C, recommended): fair per-endpoint claim with a per-endpoint in-flight cap.
--   :lim  batch size (64)        :cap  max leased (in-flight) rows per endpoint, across all instances
-- Needs (migration): events_endpoint_due (company_id, event_type, next_attempt_at) WHERE state IN ('pending','leased')
--                    events_leased      (company_id, event_type)                  WHERE state = 'leased'
WITH RECURSIVE active AS (
    -- Loose index ("skip") scan over events_endpoint_due: one descent per endpoint with pending/leased
    -- rows, however many rows it has (1M held rows cost one step). The first entry of an endpoint is its
    -- smallest next_attempt_at, i.e. its head; if that is in the future the endpoint has nothing due.
    -- Enumerates from events, so endpoints without an outbox.endpoints row are included (no_endpoint).
    (SELECT e.company_id, e.event_type, e.next_attempt_at AS head_at
       FROM outbox.events e
      WHERE e.state IN ('pending', 'leased')
      ORDER BY e.company_id, e.event_type, e.next_attempt_at
      LIMIT 1)
    UNION ALL
    SELECT nxt.company_id, nxt.event_type, nxt.next_attempt_at
      FROM active a
     CROSS JOIN LATERAL (
           SELECT e.company_id, e.event_type, e.next_attempt_at
             FROM outbox.events e
            WHERE e.state IN ('pending', 'leased')
              AND (e.company_id, e.event_type) > (a.company_id, a.event_type)
            ORDER BY e.company_id, e.event_type, e.next_attempt_at
            LIMIT 1) nxt
), cand AS (
    SELECT a.company_id, a.event_type, a.head_at, :cap - i.n AS room,
           count(*) OVER () AS n_cand
      FROM active a
     CROSS JOIN LATERAL (
           -- Live leases of this endpoint: one probe of the small events_leased index, whose size is
           -- the number of rows being delivered right now, not the backlog. "IS TRUE" keeps the lease
           -- test from being an index condition on events_due/events_endpoint_due (whose future range
           -- holds every retry scheduled later), so the planner picks events_leased.
           SELECT count(*) AS n FROM outbox.events e
            WHERE e.company_id = a.company_id AND e.event_type = a.event_type
              AND e.state = 'leased' AND (e.next_attempt_at > now()) IS TRUE) i
     WHERE a.head_at <= now()
       AND i.n < :cap
       AND NOT EXISTS (SELECT 1 FROM outbox.held_endpoints h
                        WHERE h.company_id = a.company_id AND h.event_type = a.event_type)
     ORDER BY a.head_at
     LIMIT :lim              -- with >= :lim endpoints, the :lim longest-waiting ones get one row each
), ranked AS (
    -- Per candidate endpoint, its oldest due rows that no other instance has locked, locked here
    -- (FOR UPDATE SKIP LOCKED inside the LATERAL), numbered. No endpoint can need more than
    -- :lim - n_cand + 1 of them; rows locked here but not picked stay locked only until this
    -- statement commits (at most n_cand * (:lim - n_cand + 1) rows, ~1,000 worst case at n_cand ~ 32;
    -- exactly :lim once n_cand >= :lim).
    SELECT r.id, c.head_at, row_number() OVER (PARTITION BY c.company_id, c.event_type ORDER BY r.next_attempt_at) AS rn
      FROM cand c
     CROSS JOIN LATERAL (
           SELECT e.id, e.next_attempt_at
             FROM outbox.events e
            WHERE e.company_id = c.company_id AND e.event_type = c.event_type
              AND e.state IN ('pending', 'leased') AND e.next_attempt_at <= now()
            ORDER BY e.next_attempt_at
            LIMIT least(c.room, greatest(1, :lim - c.n_cand + 1))
              FOR UPDATE SKIP LOCKED) r
), picked AS (
    -- Round robin: every endpoint's 1st row (longest-waiting endpoint first), then every 2nd row, ...
    SELECT id FROM ranked ORDER BY rn, head_at LIMIT :lim
), due AS (
    -- The picked rows (already locked by this statement; re-locking them is a no-op).
    SELECT e.id, e.state = 'leased' AS lease_expired
      FROM picked p
      JOIN outbox.events e ON e.id = p.id
     WHERE e.state IN ('pending', 'leased') AND e.next_attempt_at <= now()
       FOR UPDATE OF e SKIP LOCKED
), claimed AS (
    UPDATE outbox.events AS e
       SET state = 'leased',
           attempts = e.attempts + 1,
           lease_owner = 'bench-1',
           next_attempt_at = now() + 30000::bigint * interval '1 millisecond'
      FROM due
     WHERE e.id = due.id
 RETURNING e.id, e.event_type, e.company_id, e.payload::text AS payload, e.attempts,
           e.attempts - e.attempts_at_replay AS attempts_since_replay,
           -- The retry policy's clock starts at the last replay, if any.
           -- timestamptz also holds 'infinity' and '-infinity' (a row written
           -- by hand or restored may carry them), which cannot be subtracted:
           -- an error here would fail every claim and stall the whole queue.
           -- '-infinity' counts as older than anything, 'infinity' as new.
           CASE WHEN isfinite(coalesce(e.replayed_at, e.created_at))
                THEN (extract(epoch FROM now() - coalesce(e.replayed_at, e.created_at)) * 1000)::bigint
                WHEN coalesce(e.replayed_at, e.created_at) < now() THEN 9223372036854775807
                ELSE 0 END AS age_ms,
           due.lease_expired
)
SELECT c.id, c.event_type, c.company_id, c.payload, c.attempts, c.attempts_since_replay,
       c.age_ms, c.lease_expired,
       ep.url, ep.auth_type, ep.username, ep.password, ep.token, ep.enabled
  FROM claimed AS c
  LEFT JOIN outbox.endpoints AS ep
         ON ep.company_id = c.company_id AND ep.event_type = c.event_type
