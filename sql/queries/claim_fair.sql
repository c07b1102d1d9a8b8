-- claim_fair: lease up to $1 due events to the instance named $2 for $3
-- milliseconds, taking endpoints (company and event type) in turn, at most
-- $4 in flight per endpoint on this instance unless the endpoint sets its
-- own max_in_flight. $5, $6, $7: the endpoints this instance has requests
-- in flight to, and how many (company ids, event types, counts). Returns
-- each event with its endpoint settings and whether it is its endpoint's
-- probe, then rows with a NULL id and a `note` (see the end).
--
-- The claim loop uses this one while some endpoint is held (circuit open,
-- paused, Retry-After) or at its cap, and `claim.sql`, the plain oldest-
-- first claim, while none is (src/pipeline/producer.rs says when it
-- switches). Its cost follows the endpoints with something due (not, since
-- migration 0013, every endpoint with a retry set for later), a few
-- microseconds each: about 1.5 ms a claim beside 20,000 endpoints with a
-- retry set, but also some 15 ms at 1,000 endpoints with events due, where
-- the plain claim reads its 64 rows whatever their number. So it is not
-- the only claim (docs/BENCHMARKS.md, "Issue 26": tried, and the database
-- spent 3-4 times the CPU per event in the several-hosts drain).
--
-- Plans: it is written to leave no plan that reads more than it must,
-- even one made once, without the parameters' values, from the statistics
-- of an empty table: the queue is read only by
-- index descents (the skip scan, each endpoint's rows from its head);
-- circuits and endpoints are probed by primary key inside LATERAL
-- subqueries with LIMIT 1; the updates find their rows by primary key from
-- an array. Measured from a plan made on an empty table, then 20,000
-- endpoints with a retry set and a paused endpoint holding 1,000,000 due
-- events: about 2 ms a claim (a join of the picked rows with
-- outbox.events instead read the whole table, 600 ms).
--
-- Due: pending with next_attempt_at reached. A row whose lease ran out (its
-- daemon died mid-delivery) is put back to pending by release_expired.sql,
-- keeping its lease_owner: that is how `lease_expired` is known here.
-- Claiming increments `attempts`, which fences every later update of this
-- delivery (record.sql). It runs in an explicit transaction, BEGIN and
-- COMMIT sent with it in one round trip (src/store/txn.rs), and no HTTP
-- request is made before the COMMIT has answered.
--
-- Fair between endpoints, oldest first within one (docs/design/fair-claims/
-- has the measurements behind each choice):
-- 0. `promoted`: retries set for later wait as `scheduled` (migration
--    0013); those that have come due become `pending`, at most 500 per
--    claim, soonest first, from the head of events_scheduled. This
--    statement's own snapshot does not see them as pending yet: a `more`
--    note makes the loop claim again at once, and that claim takes them.
--    So every pending row is due, and the skip scan below walks only the
--    endpoints with something due, not every endpoint with a retry set.
-- 1. `active`: a skip scan over events_endpoint_pending lists every endpoint
--    with pending rows and its head (oldest next_attempt_at, then id),
--    one index descent each: an endpoint with a million queued rows costs
--    one step.
-- 2. `sized`: for each endpoint due now, its circuit and its room (its cap
--    minus what this instance has in flight to it).
-- 3. `probes`: an open circuit whose cool-down is over (or a half-open one
--    whose probe's lease ran out) becomes half-open and gets room for one
--    event, the probe; at most $1 of them, so that each gets its probe in
--    this claim. The circuit row is taken FOR UPDATE SKIP LOCKED, so
--    of two instances claiming at once only one sends it; the other sees
--    the circuit open (its snapshot), then half-open.
-- 4. `cand`: endpoints with room and a closed (or just probing) circuit
--    that no Retry-After pauses, the $1 longest-waiting first.
-- 5. `ranked`: each candidate's oldest due rows from its head on, locked
--    inside the LATERAL (FOR UPDATE SKIP LOCKED): its share of the batch
--    ($1 over the candidates, rounded up), never more than its room.
-- 6. `picked`: round robin, every endpoint's first row (the longest-waiting
--    endpoint first), then every second row, and so on: a company's burst
--    of 100,000 events takes its turn beside another company's one event
--    instead of ahead of it.
--
-- Cost: a few microseconds per endpoint that has pending rows,
-- and nothing per row of a held endpoint's backlog (docs/BENCHMARKS.md).
WITH RECURSIVE promoted AS (
    UPDATE outbox.events AS e
       SET state = 'pending'
     -- By primary key, the ids as an array (see "Plans" above).
     WHERE e.id = ANY (ARRAY(
           SELECT s.id FROM outbox.events AS s
            WHERE s.state = 'scheduled' AND s.next_attempt_at <= now()
            ORDER BY s.next_attempt_at
            LIMIT 500
              FOR UPDATE SKIP LOCKED))
 RETURNING e.id
), active AS (
    (SELECT e.company_id, e.event_type, e.next_attempt_at AS head_at, e.id AS head_id
       FROM outbox.events AS e
      WHERE e.state = 'pending'
      ORDER BY e.company_id, e.event_type, e.next_attempt_at, e.id
      LIMIT 1)
    UNION ALL
    SELECT nxt.company_id, nxt.event_type, nxt.next_attempt_at, nxt.id
      FROM active AS a
     CROSS JOIN LATERAL (
           SELECT e.company_id, e.event_type, e.next_attempt_at, e.id
             FROM outbox.events AS e
            WHERE e.state = 'pending'
              AND (e.company_id, e.event_type) > (a.company_id, a.event_type)
            ORDER BY e.company_id, e.event_type, e.next_attempt_at, e.id
            LIMIT 1) AS nxt
), probes AS (
    UPDATE outbox.endpoint_circuits AS ci
       SET state = 'half_open',
           retry_at = now() + $3::bigint * interval '1 millisecond'
      FROM (SELECT c.company_id, c.event_type
              FROM active AS a
             -- Each endpoint with something due, its circuit by primary
             -- key (LATERAL with LIMIT 1: no plan can read the whole table).
             -- Every ready circuit is locked until this claim commits; only
             -- those it probes are changed.
             CROSS JOIN LATERAL (
                   SELECT x.company_id, x.event_type, x.retry_at
                     FROM outbox.endpoint_circuits AS x
                    WHERE x.company_id = a.company_id AND x.event_type = a.event_type
                      AND x.state IN ('open', 'half_open') AND NOT x.manual
                      AND x.retry_at <= now()
                      AND (x.paused_until IS NULL OR x.paused_until <= now())
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED) AS c
             WHERE a.head_at <= now()
             -- No more than this claim can send: a circuit made half-open
             -- without its probe would wait a lease for one. The longest
             -- waiting first; the others stay open, ready for the next claim.
             ORDER BY c.retry_at
             LIMIT $1) AS ready
     WHERE ci.company_id = ready.company_id AND ci.event_type = ready.event_type
 RETURNING ci.company_id, ci.event_type
), sized AS (
    SELECT a.company_id, a.event_type, a.head_at, a.head_id,
           p.company_id IS NOT NULL AS probe,
           coalesce(ci.failures > 0 OR ci.state <> 'closed', false) AS circuit_dirty,
           -- Held: the circuit is not closed (and this claim took no probe),
           -- or a Retry-After pauses the endpoint.
           p.company_id IS NULL AND ci.company_id IS NOT NULL
               AND (ci.state <> 'closed' OR coalesce(ci.paused_until > now(), false)) AS held,
           CASE WHEN p.company_id IS NOT NULL THEN 1
                ELSE coalesce(ep.max_in_flight, $4::int) - coalesce(live.n, 0) END AS room
      FROM active AS a
      LEFT JOIN probes AS p
             ON p.company_id = a.company_id AND p.event_type = a.event_type
      LEFT JOIN LATERAL (
            SELECT x.company_id, x.state, x.paused_until, x.failures
              FROM outbox.endpoint_circuits AS x
             WHERE x.company_id = a.company_id AND x.event_type = a.event_type
             LIMIT 1) AS ci ON true
      LEFT JOIN LATERAL (
            SELECT x.max_in_flight
              FROM outbox.endpoints AS x
             WHERE x.company_id = a.company_id AND x.event_type = a.event_type
             LIMIT 1) AS ep ON true
      LEFT JOIN unnest($5::bigint[], $6::text[], $7::int[]) AS live(company_id, event_type, n)
             ON live.company_id = a.company_id AND live.event_type = a.event_type
     WHERE a.head_at <= now()
), cand AS (
    SELECT s.company_id, s.event_type, s.head_at, s.head_id, s.room, s.probe, s.circuit_dirty,
           count(*) OVER () AS n_cand
      FROM sized AS s
     WHERE NOT s.held AND s.room > 0
     ORDER BY s.probe DESC, s.head_at
     LIMIT $1
), ranked AS (
    SELECT r.id, r.next_attempt_at, r.lease_expired, c.probe, c.circuit_dirty, c.company_id,
           c.event_type, c.head_at, c.room,
           least(c.room, ($1 + c.n_cand - 1) / c.n_cand) AS share,
           row_number() OVER (PARTITION BY c.company_id, c.event_type
                              ORDER BY r.next_attempt_at, r.id) AS rn
      FROM cand AS c
     CROSS JOIN LATERAL (
           -- From the head on: the entries before it are of rows claimed
           -- since the last vacuum, and are not walked again. The bound is
           -- written on the whole key of events_endpoint_pending, which no other
           -- index can serve (on events_pending_due it would look like a narrow
           -- range of times, and the planner would sort what it read).
           SELECT e.id, e.next_attempt_at, e.lease_owner IS NOT NULL AS lease_expired
             FROM outbox.events AS e
            WHERE e.company_id = c.company_id AND e.event_type = c.event_type
              AND e.state = 'pending' AND e.next_attempt_at <= now()
              AND (e.company_id, e.event_type, e.next_attempt_at, e.id)
                  >= (c.company_id, c.event_type, c.head_at, c.head_id)
            ORDER BY e.company_id, e.event_type, e.next_attempt_at, e.id
            LIMIT least(c.room, ($1 + c.n_cand - 1) / c.n_cand)
              FOR UPDATE SKIP LOCKED) AS r
), picked AS (
    SELECT id, lease_expired, probe, circuit_dirty, next_attempt_at AS due_at
      FROM ranked ORDER BY rn, head_at LIMIT $1
), claimed AS (
    UPDATE outbox.events AS e
       -- A row with a million attempts or more (only a hand-written one
       -- can get there) is not claimed once more: near the integer limit,
       -- adding one would fail this whole statement, every claim, for as
       -- long as the row is due. It fails instead, with the reason, unsent,
       -- and comes back as a `worn_out` note.
       SET state = CASE WHEN e.attempts < 1000000 THEN 'leased' ELSE 'failed' END,
           attempts = e.attempts + CASE WHEN e.attempts < 1000000 THEN 1 ELSE 0 END,
           lease_owner = CASE WHEN e.attempts < 1000000 THEN $2 END,
           next_attempt_at = CASE WHEN e.attempts < 1000000
                                  THEN now() + $3::bigint * interval '1 millisecond'
                                  ELSE e.next_attempt_at END,
           last_error = CASE WHEN e.attempts < 1000000 THEN e.last_error
                             ELSE 'not sent: attempts is at its limit of 1000000 '
                                  '(a row written by hand?); replay it after fixing attempts' END
     -- By primary key, the ids as an array: no join with the table, so no
     -- plan can read more of it than these rows.
     WHERE e.id = ANY (ARRAY(SELECT p.id FROM picked AS p))
 RETURNING e.id, e.state, e.event_type, e.company_id, e.payload::text AS payload, e.attempts,
           -- In bigint, bounded: a hand-written attempts_at_replay (the
           -- table has no CHECK constraints since 0009) must not overflow
           -- and fail every claim.
           greatest(least(e.attempts::bigint - e.attempts_at_replay, 2147483647), 0)::int
               AS attempts_since_replay,
           -- The retry policy's clock starts at the last replay, if any.
           -- timestamptz also holds 'infinity' and '-infinity' (a row written
           -- by hand or restored may carry them), which cannot be subtracted:
           -- an error here would fail every claim and stall the whole queue.
           -- '-infinity' counts as older than anything, 'infinity' as new.
           CASE WHEN isfinite(coalesce(e.replayed_at, e.created_at))
                THEN (extract(epoch FROM now() - coalesce(e.replayed_at, e.created_at)) * 1000)::bigint
                WHEN coalesce(e.replayed_at, e.created_at) < now() THEN 9223372036854775807
                ELSE 0 END AS age_ms
), notes AS (
    -- capped: an endpoint with more due than its room, at its cap before
    -- this claim or filled by it (the loop claims again when one of its
    -- deliveries ends). more: some endpoint got its whole share but not its
    -- room and may have more due, or retries came due (`promoted`): the
    -- loop claims again at once. held: some endpoint with due events is
    -- held or at its cap (the loop stays with this claim).
    SELECT s.company_id, s.event_type, 'capped' AS note
      FROM sized AS s WHERE NOT s.held AND s.room <= 0
    UNION ALL
    SELECT r.company_id, r.event_type, 'capped'
      FROM ranked AS r WHERE r.rn = r.room
    UNION ALL
    SELECT NULL, NULL, 'more'
     WHERE EXISTS (SELECT 1 FROM ranked AS r WHERE r.rn = r.share AND r.share < r.room)
        OR EXISTS (SELECT 1 FROM promoted)
    UNION ALL
    SELECT NULL, NULL, 'held'
     WHERE EXISTS (SELECT 1 FROM sized AS s WHERE s.held OR s.room <= 0 OR s.probe)
)
SELECT c.id, c.event_type, c.company_id, c.payload, c.attempts, c.attempts_since_replay,
       c.age_ms, p.lease_expired, p.probe, p.circuit_dirty,
       -- When it was due before this claim: a probe that fails is put back
       -- so, its hold counted from then (policy::decide, record.sql).
       p.due_at,
       ep.url, ep.auth_type, ep.username, ep.password, ep.token, ep.enabled,
       -- The endpoint's active signing secrets, newest first (none: unsigned).
       ARRAY(SELECT s.secret FROM outbox.endpoint_signing_secrets AS s
              WHERE s.company_id = ep.company_id AND s.event_type = ep.event_type
                AND (s.expires_at IS NULL OR s.expires_at > now())
              ORDER BY s.id DESC) AS signing_secrets, 
       -- worn_out: failed above, at the bound on attempts; not to be sent.
       CASE WHEN c.state = 'failed' THEN 'worn_out' END AS note
  FROM claimed AS c
  JOIN picked AS p ON p.id = c.id
  LEFT JOIN LATERAL (
        SELECT x.company_id, x.event_type, x.url, x.auth_type, x.username, x.password,
               x.token, x.enabled
          FROM outbox.endpoints AS x
         WHERE x.company_id = c.company_id AND x.event_type = c.event_type
         LIMIT 1) AS ep ON true
UNION ALL
SELECT NULL::uuid, k.event_type, k.company_id, NULL::text, NULL::int, NULL::int,
       NULL::bigint, NULL::bool, NULL::bool, NULL::bool, NULL::timestamptz,
       NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bool, NULL::text[],
       k.note
  FROM notes AS k
