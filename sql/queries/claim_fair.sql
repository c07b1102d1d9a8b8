-- claim_fair: lease up to $1 due events to the instance named $2 for $3
-- milliseconds, taking endpoints (company and event type) in turn, at most
-- $4 in flight per endpoint on this instance unless the endpoint sets its
-- own max_in_flight. $5, $6, $7: the endpoints this instance has requests
-- in flight to, and how many (company ids, event types, counts). $8, $9:
-- the endpoint the last claim stopped after (company id, event type; 0 and
-- '' at first), where this one goes on. $10, $11: destinations (an
-- endpoint's host and port) and the room each has on this instance; $12
-- the room of any other destination (the cap per destination); $13 the
-- most an endpoint's own max_in_flight counts for. Returns each event with its
-- endpoint settings and whether it is its endpoint's probe, then rows with
-- a NULL id and a `note` (see the end).
--
-- The claim loop takes this one for a second at a time when rows of held
-- endpoints (circuit open, paused, Retry-After) or of endpoints at their
-- cap crowd the head of the queue in numbers too large for `claim.sql`,
-- the plain oldest-first claim, to step over cheaply, or a circuit is
-- ready for its probe; the plain claim otherwise (src/pipeline/producer.rs,
-- `Steps`, says when it switches). It walks the
-- endpoints with pending rows in the order of their keys, round robin:
-- from the one after $8/$9 to the end, then from the first, and stops
-- when it has passed as many endpoints able to send as the claim wants
-- (due, not held, with room on this instance, or with a circuit ready for
-- its probe), or after 1,000 endpoints, or when it is back where it
-- began. So its cost follows the batch it leases, not the number of
-- endpoints with something due, nor what a held endpoint has queued; and
-- an endpoint with something due gets its turn within a few claims however
-- many others have something due. (Until issue 26 it walked every
-- endpoint with something due: some 15 ms a claim at 1,000 of them, which
-- one held endpoint anywhere imposed on every instance. It still costs
-- about twice the plain claim per event leased, so it is not the only
-- claim: docs/BENCHMARKS.md, "Issue 26".)
--
-- Plans: it is written to leave no plan that reads more than it must,
-- even one made once, without the parameters' values, from the statistics
-- of an empty table: the queue is read
-- only by index descents of events_endpoint_pending (the walk, each
-- endpoint's rows from its head); circuits and endpoints are probed by
-- primary key inside LATERAL subqueries with LIMIT 1; the updates find
-- their rows by primary key from an array. (A join of the picked rows
-- with outbox.events instead read the whole table: 600 ms.)
--
-- Due: pending with next_attempt_at reached. A row whose lease ran out (its
-- daemon died mid-delivery) is put back to pending by release_expired.sql,
-- keeping its lease_owner: that is how `lease_expired` is known here.
-- Claiming increments `attempts`, which fences every later update of this
-- delivery (record.sql). It runs in an explicit transaction, BEGIN and
-- COMMIT sent with it in one round trip (src/store/txn.rs), and no HTTP
-- request is made before the COMMIT has answered: PostgreSQL sends an
-- implicit transaction's rows before it commits.
--
-- Steps (docs/design/fair-claims/ has the measurements behind each):
-- 0. `promoted`: retries set for later wait as `scheduled` (migration
--    0013); those that have come due become `pending`, at most 500 per
--    claim, soonest first, from the head of events_scheduled. This
--    statement's own snapshot does not see them as pending yet: a `more`
--    note makes the loop claim again at once, and that claim takes them.
--    So every pending row is due, and the walk meets only endpoints with
--    something due, not every endpoint with a retry set.
-- 1. `walk`: the endpoints with pending rows from the cursor on, one index
--    descent each (an endpoint with a million queued rows costs one step),
--    with each one's head (oldest next_attempt_at, then id), and its
--    circuit, cap and what this instance has in flight to it, all by
--    primary key. It counts those able to send (due, no
--    Retry-After, a closed circuit and room, or a circuit ready for its
--    probe) and stops at as many as wanted.
-- 2. `probes`: an open circuit whose cool-down is over (or a half-open one
--    whose probe's lease ran out) becomes half-open and gets room for one
--    event, the probe; at most $1 of them. The circuit row and the probe's
--    row are taken FOR UPDATE SKIP LOCKED, so of two instances claiming at
--    once only one sends it (the other sees the circuit open, its
--    snapshot, then half-open), and a circuit whose oldest row another
--    claim holds stays open rather than half-open with no probe.
-- 3. `sized`: each endpoint's room (its cap minus what this instance has
--    in flight to it, from the walk) and whether it is held.
-- 4. `cand`: endpoints with room and a closed (or just probing) circuit
--    that no Retry-After pauses, probes first, then in the walk's order.
-- 5. `ranked`: each candidate's oldest due rows from its head on, locked
--    inside the LATERAL (FOR UPDATE SKIP LOCKED): its share of the batch
--    ($1 over the candidates, rounded up), never more than its room.
-- 6. `picked`: round robin, every endpoint's first row in the walk's
--    order, then every second row, and so on: a company's burst of
--    100,000 events takes its turn beside another company's one event
--    instead of ahead of it.
-- 7. The cursor for the next claim: just before the first candidate that
--    got nothing (the batch, or its destination's room, was full before
--    its turn), or else the last endpoint walked. An endpoint whose
--    destination had no room at all is not a candidate: the cursor goes
--    past it, or every claim would begin there while that destination
--    stays full.
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
), walk AS (
    -- Where the last walk stopped (n = 0, not an endpoint), then each
    -- endpoint after it: the next key, or else (`wrapped`) the first.
    SELECT $8::bigint AS company_id, $9::text AS event_type, NULL::timestamptz AS head_at,
           NULL::uuid AS head_id, false AS wrapped, 0 AS n, NULL::text AS ci_state,
           NULL::timestamptz AS paused_until, NULL::int AS failures, NULL::bool AS manual,
           NULL::timestamptz AS retry_at, NULL::int AS max_in_flight, 0 AS live_n, 0 AS able,
           NULL::text AS destination, 0 AS dest_room
    UNION ALL
    SELECT nxt.company_id, nxt.event_type, nxt.head_at, nxt.head_id, nxt.wrapped, w.n + 1,
           k.ci_state, k.paused_until, k.failures, k.manual, k.retry_at, k.max_in_flight,
           k.live_n, w.able + k.able, k.destination, k.dest_room
      FROM walk AS w
     CROSS JOIN LATERAL (
           (SELECT e.company_id, e.event_type, e.next_attempt_at AS head_at, e.id AS head_id,
                   w.wrapped AS wrapped
              FROM outbox.events AS e
             WHERE e.state = 'pending'
               AND (e.company_id, e.event_type) > (w.company_id, w.event_type)
             ORDER BY e.company_id, e.event_type, e.next_attempt_at, e.id
             LIMIT 1)
           UNION ALL
           -- Past the last endpoint: on from the first, once.
           (SELECT e.company_id, e.event_type, e.next_attempt_at, e.id, true
              FROM outbox.events AS e
             WHERE e.state = 'pending' AND NOT w.wrapped
             ORDER BY e.company_id, e.event_type, e.next_attempt_at, e.id
             LIMIT 1)
           LIMIT 1) AS nxt
      CROSS JOIN LATERAL (
            -- Its circuit and settings by primary key, and what this
            -- instance has in flight to it; able to send: due, no
            -- Retry-After, room at its destination, and a closed circuit
            -- (or none) with room, or a circuit ready for its probe. An
            -- endpoint's own max_in_flight counts for at most $13.
            SELECT ci.state AS ci_state, ci.paused_until, ci.failures, ci.manual, ci.retry_at,
                   ep.max_in_flight, coalesce(lv.n, 0) AS live_n,
                   CASE WHEN nxt.head_at <= now()
                         AND coalesce(ci.paused_until <= now(), true)
                         AND coalesce(dr.room, $12::int) > 0
                         AND (((ci.state IS NULL OR ci.state = 'closed')
                               AND least(coalesce(ep.max_in_flight, $4::int), $13::int)
                                   > coalesce(lv.n, 0))
                              OR (ci.state IN ('open', 'half_open') AND NOT ci.manual
                                  AND ci.retry_at <= now()))
                        THEN 1 ELSE 0 END AS able,
                   ep.destination, coalesce(dr.room, $12::int) AS dest_room
              FROM (SELECT 1) AS one
              LEFT JOIN LATERAL (
                    SELECT x.state, x.paused_until, x.failures, x.manual, x.retry_at
                      FROM outbox.endpoint_circuits AS x
                     WHERE x.company_id = nxt.company_id AND x.event_type = nxt.event_type
                     LIMIT 1) AS ci ON true
              LEFT JOIN LATERAL (
                    SELECT x.max_in_flight, x.destination
                      FROM outbox.endpoints AS x
                     WHERE x.company_id = nxt.company_id AND x.event_type = nxt.event_type
                     LIMIT 1) AS ep ON true
              LEFT JOIN LATERAL (
                    SELECT d.room
                      FROM unnest($10::text[], $11::int[]) AS d(destination, room)
                     WHERE d.destination = ep.destination
                     LIMIT 1) AS dr ON true
              LEFT JOIN LATERAL (
                    SELECT l.n
                      FROM unnest($5::bigint[], $6::text[], $7::int[]) AS l(company_id, event_type, n)
                     WHERE l.company_id = nxt.company_id AND l.event_type = nxt.event_type
                     LIMIT 1) AS lv ON true) AS k
     WHERE w.n < 1000
       AND w.able < $1::bigint
       -- Back where it began: the cursor's own endpoint is the last one.
       AND NOT (nxt.wrapped AND (nxt.company_id, nxt.event_type) > ($8::bigint, $9::text))
), probes AS (
    UPDATE outbox.endpoint_circuits AS ci
       SET state = 'half_open',
           retry_at = now() + $3::bigint * interval '1 millisecond'
      FROM (SELECT r.company_id, r.event_type
              FROM (SELECT c.company_id, c.event_type, c.retry_at, w.dest_room,
                           -- At most as many probes per destination as it
                           -- has room for: one refused a place would leave
                           -- its circuit half-open with no probe out.
                           row_number() OVER (PARTITION BY w.destination
                                              ORDER BY c.retry_at) AS dest_rn
              FROM walk AS w
             -- Its circuit by primary key (LATERAL with LIMIT 1: no plan
             -- can read the whole table), locked until this claim commits;
             -- only those it probes are changed.
             CROSS JOIN LATERAL (
                   SELECT x.company_id, x.event_type, x.retry_at
                     FROM outbox.endpoint_circuits AS x
                    WHERE x.company_id = w.company_id AND x.event_type = w.event_type
                      AND x.state IN ('open', 'half_open') AND NOT x.manual
                      AND x.retry_at <= now()
                      AND (x.paused_until IS NULL OR x.paused_until <= now())
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED) AS c
             -- And its probe, the endpoint's oldest due row, locked now: a
             -- row another claim holds (a plain claim reads held rows too)
             -- would leave the circuit half-open with no probe out for a
             -- whole lease. Such a circuit stays open for the next claim.
             CROSS JOIN LATERAL (
                   SELECT e.id
                     FROM outbox.events AS e
                    WHERE e.id = w.head_id AND e.state = 'pending'
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED) AS h
             WHERE w.ci_state IN ('open', 'half_open') AND w.head_at <= now()) AS r
             WHERE r.dest_rn <= r.dest_room
             -- No more than this claim can send: a circuit made half-open
             -- without its probe would wait a lease for one. The longest
             -- waiting first; the others stay open, ready for the next claim.
             ORDER BY r.retry_at
             LIMIT $1) AS ready
     WHERE ci.company_id = ready.company_id AND ci.event_type = ready.event_type
 RETURNING ci.company_id, ci.event_type
), sized AS (
    SELECT w.company_id, w.event_type, w.head_at, w.head_id, w.n, w.destination, w.dest_room,
           p.company_id IS NOT NULL AS probe,
           coalesce(w.failures > 0 OR w.ci_state <> 'closed', false) AS circuit_dirty,
           -- Held: the circuit is not closed (and this claim took no probe),
           -- or a Retry-After pauses the endpoint.
           p.company_id IS NULL AND w.ci_state IS NOT NULL
               AND (w.ci_state <> 'closed' OR coalesce(w.paused_until > now(), false)) AS held,
           CASE WHEN p.company_id IS NOT NULL THEN 1
                ELSE least(coalesce(w.max_in_flight, $4::int), $13::int) - w.live_n END AS room
      FROM walk AS w
      LEFT JOIN probes AS p
             ON p.company_id = w.company_id AND p.event_type = w.event_type
     WHERE w.head_at <= now()
), cand AS (
    SELECT s.company_id, s.event_type, s.head_at, s.head_id, s.room, s.probe, s.circuit_dirty,
           s.n, s.destination, s.dest_room, count(*) OVER () AS n_cand
      FROM sized AS s
     WHERE NOT s.held AND s.room > 0 AND s.dest_room > 0
     ORDER BY s.probe DESC, s.n
     LIMIT $1
), ranked AS (
    SELECT r.id, r.next_attempt_at, r.lease_expired, c.probe, c.circuit_dirty, c.company_id,
           c.event_type, c.n, c.room, c.destination, c.dest_room,
           least(c.room, ($1 + c.n_cand - 1) / c.n_cand) AS share,
           row_number() OVER (PARTITION BY c.company_id, c.event_type
                              ORDER BY r.next_attempt_at, r.id) AS rn
      FROM cand AS c
     CROSS JOIN LATERAL (
           -- From the head on: the entries before it are of rows claimed
           -- since the last vacuum, and are not walked again. The bound is
           -- written on the whole key of events_endpoint_pending, which no
           -- other index can serve.
           SELECT e.id, e.next_attempt_at, e.lease_owner IS NOT NULL AS lease_expired
             FROM outbox.events AS e
            WHERE e.company_id = c.company_id AND e.event_type = c.event_type
              AND e.state = 'pending' AND e.next_attempt_at <= now()
              AND (e.company_id, e.event_type, e.next_attempt_at, e.id)
                  >= (c.company_id, c.event_type, c.head_at, c.head_id)
            ORDER BY e.company_id, e.event_type, e.next_attempt_at, e.id
            LIMIT least(c.room, ($1 + c.n_cand - 1) / c.n_cand)
              FOR UPDATE SKIP LOCKED) AS r
), placed AS (
    -- The cap per destination: each destination's rows in the round
    -- robin's order, up to its room.
    SELECT r.*,
           r.destination IS NOT NULL
           AND row_number() OVER (PARTITION BY r.destination ORDER BY r.rn, r.probe DESC, r.n)
               > r.dest_room AS dest_full
      FROM ranked AS r
), picked AS (
    SELECT id, lease_expired, probe, circuit_dirty, next_attempt_at AS due_at, n
      FROM placed WHERE NOT dest_full ORDER BY rn, probe DESC, n LIMIT $1
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
    -- room and may have more due; or the walk stopped at as many endpoints
    -- able to send as wanted, and the batch got some but is not full
    -- (rows taken by another instance meanwhile: look further); or retries
    -- came due (`promoted`): the loop claims again at once. cursor: where
    -- the next claim goes on (step 7).
    SELECT s.company_id, s.event_type, NULL::text AS destination, 'capped' AS note
      FROM sized AS s WHERE NOT s.held AND s.room <= 0
    UNION ALL
    SELECT r.company_id, r.event_type, NULL, 'capped'
      FROM placed AS r WHERE r.rn = r.room AND NOT r.dest_full
    UNION ALL
    -- capped, with a destination: an endpoint with due rows whose
    -- destination's room is used up (before this claim, or by it).
    SELECT DISTINCT s.company_id, s.event_type, s.destination, 'capped'
      FROM sized AS s WHERE NOT s.held AND s.room > 0 AND s.dest_room <= 0
    UNION ALL
    SELECT DISTINCT r.company_id, r.event_type, r.destination, 'capped'
      FROM placed AS r WHERE r.dest_full
    UNION ALL
    SELECT NULL, NULL, NULL, 'more'
     WHERE EXISTS (SELECT 1 FROM placed AS r
                    WHERE r.rn = r.share AND r.share < r.room AND NOT r.dest_full)
        OR EXISTS (SELECT 1 FROM promoted)
        OR ((SELECT max(w.able) FROM walk AS w) >= $1::bigint
            AND (SELECT count(*) FROM picked) BETWEEN 1 AND $1 - 1)
    UNION ALL
    -- far: the walk stopped at its bound of 1,000 endpoints, none of them
    -- able enough to fill the batch (held ones, mostly): the loop walks on
    -- at once, a few times per wake-up.
    SELECT NULL, NULL, NULL, 'far'
     WHERE (SELECT max(w.n) FROM walk AS w) >= 1000
       AND (SELECT count(*) FROM picked) < $1
    UNION ALL
    (SELECT w.company_id, w.event_type, NULL, 'cursor'
      FROM walk AS w
     WHERE w.n > 0 AND w.n < coalesce((SELECT min(s.n) FROM sized AS s
                            WHERE NOT s.held AND s.room > 0 AND s.dest_room > 0
                              AND NOT EXISTS (SELECT 1 FROM picked AS p WHERE p.n = s.n)),
                          2147483647)
     ORDER BY w.n DESC
     LIMIT 1)
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
       ep.destination,
       -- worn_out: failed above, at the bound on attempts; not to be sent.
       CASE WHEN c.state = 'failed' THEN 'worn_out' END AS note
  FROM claimed AS c
  JOIN picked AS p ON p.id = c.id
  LEFT JOIN LATERAL (
        SELECT x.company_id, x.event_type, x.url, x.auth_type, x.username, x.password,
               x.token, x.enabled, x.destination
          FROM outbox.endpoints AS x
         WHERE x.company_id = c.company_id AND x.event_type = c.event_type
         LIMIT 1) AS ep ON true
UNION ALL
SELECT NULL::uuid, k.event_type, k.company_id, NULL::text, NULL::int, NULL::int,
       NULL::bigint, NULL::bool, NULL::bool, NULL::bool, NULL::timestamptz,
       NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bool, NULL::text[],
       k.destination, k.note
  FROM notes AS k
