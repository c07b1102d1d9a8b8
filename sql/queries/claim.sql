-- claim: lease up to $1 due events to the instance named $2 for $3
-- milliseconds, at most $4 in flight per endpoint (company and event type)
-- unless the endpoint sets its own max_in_flight, and return each with its
-- endpoint settings and whether it is its endpoint's probe; then one row
-- with a NULL id per endpoint left at its cap (the claim loop claims again
-- when one of its deliveries ends).
--
-- Due: pending with next_attempt_at reached, or leased with the lease run out
-- (its daemon died mid-delivery). Claiming increments `attempts`, which
-- fences every later update of this delivery (record.sql). The statement
-- commits on its own, before any HTTP request is made.
--
-- Fair between endpoints, oldest first within one (docs/design/fair-claims/
-- has the measurements behind each choice):
-- 1. `active`: a skip scan over events_endpoint_due lists every endpoint with
--    pending or leased rows and its head (oldest next_attempt_at), one index
--    descent each: an endpoint with a million queued rows costs one step.
-- 2. `sized`: for each endpoint due now, its circuit and its room: the cap
--    minus its live leases, counted in the small events_leased index. The
--    count covers every instance's leases, so the cap holds across
--    instances; two claims racing can each fill the same room, so N
--    instances put at most N x cap requests in flight to one endpoint, cap
--    in steady state.
-- 3. `probes`: an open circuit whose cool-down is over (or a half-open one
--    whose probe's lease ran out) becomes half-open and gets room for one
--    event, the probe. The circuit row is taken FOR UPDATE SKIP LOCKED, so
--    of two instances claiming at once only one sends it; the other sees
--    the circuit open (its snapshot), then half-open with the probe leased.
-- 4. `cand`: endpoints with room and a closed (or just probing) circuit
--    that no Retry-After pauses, the $1 longest-waiting first.
-- 5. `ranked`: each candidate's oldest due rows, locked inside the LATERAL
--    (FOR UPDATE SKIP LOCKED): as many as its room, and never more than it
--    could get in this batch. Rows locked there but not picked stay locked
--    only until this statement commits.
-- 6. `picked`: round robin, every endpoint's first row (the longest-waiting
--    endpoint first), then every second row, and so on: a company's burst
--    of 100,000 events takes its turn beside another company's one event
--    instead of ahead of it.
--
-- Cost: about 10-15 µs per endpoint that has pending or leased rows, and
-- nothing per row of a held endpoint's backlog (measured: 5.6-9.7 ms at 300
-- active endpoints with and without a held backlog of 1,000,000 rows).
WITH RECURSIVE active AS (
    (SELECT e.company_id, e.event_type, e.next_attempt_at AS head_at
       FROM outbox.events AS e
      WHERE e.state IN ('pending', 'leased')
      ORDER BY e.company_id, e.event_type, e.next_attempt_at
      LIMIT 1)
    UNION ALL
    SELECT nxt.company_id, nxt.event_type, nxt.next_attempt_at
      FROM active AS a
     CROSS JOIN LATERAL (
           SELECT e.company_id, e.event_type, e.next_attempt_at
             FROM outbox.events AS e
            WHERE e.state IN ('pending', 'leased')
              AND (e.company_id, e.event_type) > (a.company_id, a.event_type)
            ORDER BY e.company_id, e.event_type, e.next_attempt_at
            LIMIT 1) AS nxt
), probes AS (
    UPDATE outbox.endpoint_circuits AS ci
       SET state = 'half_open',
           retry_at = now() + $3::bigint * interval '1 millisecond'
      FROM (SELECT c.company_id, c.event_type
              FROM outbox.endpoint_circuits AS c
             WHERE c.state IN ('open', 'half_open') AND NOT c.manual
               AND c.retry_at <= now()
               AND (c.paused_until IS NULL OR c.paused_until <= now())
               AND EXISTS (SELECT 1 FROM outbox.events AS e
                            WHERE e.company_id = c.company_id AND e.event_type = c.event_type
                              AND e.state IN ('pending', 'leased') AND e.next_attempt_at <= now())
               FOR UPDATE SKIP LOCKED) AS ready
     WHERE ci.company_id = ready.company_id AND ci.event_type = ready.event_type
 RETURNING ci.company_id, ci.event_type
), sized AS (
    SELECT a.company_id, a.event_type, a.head_at,
           p.company_id IS NOT NULL AS probe,
           -- Held: the circuit is not closed (and this claim took no probe),
           -- or a Retry-After pauses the endpoint.
           p.company_id IS NULL AND ci.company_id IS NOT NULL
               AND (ci.state <> 'closed' OR coalesce(ci.paused_until > now(), false)) AS held,
           CASE WHEN p.company_id IS NOT NULL THEN 1
                ELSE coalesce(ep.max_in_flight, $4::int) - live.n END AS room
      FROM active AS a
      LEFT JOIN probes AS p
             ON p.company_id = a.company_id AND p.event_type = a.event_type
      LEFT JOIN outbox.endpoint_circuits AS ci
             ON ci.company_id = a.company_id AND ci.event_type = a.event_type
      LEFT JOIN outbox.endpoints AS ep
             ON ep.company_id = a.company_id AND ep.event_type = a.event_type
     CROSS JOIN LATERAL (
           -- "IS TRUE" keeps the lease test from becoming an index condition
           -- on events_due or events_endpoint_due, whose future range holds
           -- every retry scheduled later: the planner then takes events_leased.
           SELECT count(*) AS n
             FROM outbox.events AS e
            WHERE e.company_id = a.company_id AND e.event_type = a.event_type
              AND e.state = 'leased' AND (e.next_attempt_at > now()) IS TRUE) AS live
     WHERE a.head_at <= now()
), cand AS (
    SELECT s.company_id, s.event_type, s.head_at, s.room, s.probe, count(*) OVER () AS n_cand
      FROM sized AS s
     WHERE NOT s.held AND s.room > 0
     ORDER BY s.probe DESC, s.head_at
     LIMIT $1
), ranked AS (
    SELECT r.id, r.lease_expired, c.probe, c.company_id, c.event_type, c.head_at, c.room,
           row_number() OVER (PARTITION BY c.company_id, c.event_type
                              ORDER BY r.next_attempt_at, r.id) AS rn
      FROM cand AS c
     CROSS JOIN LATERAL (
           SELECT e.id, e.next_attempt_at, e.state = 'leased' AS lease_expired
             FROM outbox.events AS e
            WHERE e.company_id = c.company_id AND e.event_type = c.event_type
              AND e.state IN ('pending', 'leased') AND e.next_attempt_at <= now()
            ORDER BY e.next_attempt_at
            LIMIT least(c.room, greatest(1, $1 - c.n_cand + 1))
              FOR UPDATE SKIP LOCKED) AS r
), picked AS (
    SELECT id, lease_expired, probe FROM ranked ORDER BY rn, head_at LIMIT $1
), claimed AS (
    UPDATE outbox.events AS e
       SET state = 'leased',
           attempts = e.attempts + 1,
           lease_owner = $2,
           next_attempt_at = now() + $3::bigint * interval '1 millisecond'
      FROM picked
     WHERE e.id = picked.id
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
           picked.lease_expired, picked.probe
), capped AS (
    -- Endpoints with more due than their room: at the cap before this
    -- claim, or filled by it.
    SELECT s.company_id, s.event_type
      FROM sized AS s
     WHERE NOT s.held
       AND (s.room <= 0
            OR s.room <= (SELECT count(*) FROM ranked AS r
                           WHERE r.company_id = s.company_id AND r.event_type = s.event_type))
)
SELECT c.id, c.event_type, c.company_id, c.payload, c.attempts, c.attempts_since_replay,
       c.age_ms, c.lease_expired, c.probe,
       ep.url, ep.auth_type, ep.username, ep.password, ep.token, ep.enabled
  FROM claimed AS c
  LEFT JOIN outbox.endpoints AS ep
         ON ep.company_id = c.company_id AND ep.event_type = c.event_type
UNION ALL
SELECT NULL::uuid, k.event_type, k.company_id, NULL::text, NULL::int, NULL::int,
       NULL::bigint, NULL::bool, NULL::bool,
       NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bool
  FROM capped AS k
