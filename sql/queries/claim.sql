-- claim: lease up to $1 due events to the instance named $2 for $3
-- milliseconds, oldest first, and return each with its endpoint settings.
-- The same rows as claim_fair.sql, and its first parameters: $4 is the cap
-- per endpoint on this instance (an endpoint's max_in_flight wins), and
-- $5, $6, $7 the endpoints this instance has requests in flight to, and
-- how many. $8, $9: the endpoints to step over (company ids, event types):
-- those the last claims found held or at their cap, or whose destination
-- is. $10, $11: destinations (an endpoint's host and port) and the room
-- each has on this instance; $12 the room of any other destination (the
-- cap per destination); $13 the most an endpoint's own max_in_flight
-- counts for.
--
-- The plain claim, the one taken unless held rows crowd the head of the
-- queue. It takes the $1 oldest due rows, as one ordered walk of the
-- partial index events_pending_due (FOR UPDATE SKIP LOCKED lets several
-- daemons claim side by side without queueing behind each other's row
-- locks), and leases those whose endpoint has room and no held circuit.
-- Rows of the endpoints in $8/$9 are passed over in that walk before they
-- are locked, so they cost a look each (about 0.25 us) and no lock, and
-- the walk goes on to $1 rows it can lease. The rows it locks and leaves
-- (an endpoint it did not know held or full) come back as notes, one per
-- endpoint; the loop counts their due rows (step_counts.sql) and steps
-- over them next time (src/pipeline/producer.rs, `Steps`), or takes the
-- fair claim for a while when there are too many to step over cheaply. A circuit
-- ready for its probe among them has the next claim be the fair one, which
-- alone sends probes.
--
-- Due: pending with next_attempt_at reached. A row whose lease ran out (its
-- daemon died mid-delivery) is put back to pending by release_expired.sql,
-- keeping its lease_owner: that is how `lease_expired` is known here.
-- Claiming increments `attempts`, which fences every later update of this
-- delivery (record.sql). The statement runs in an explicit transaction,
-- BEGIN and COMMIT sent with it in one round trip (src/store/txn.rs,
-- begin_durable.sql), and no HTTP request is made before the COMMIT has
-- answered: PostgreSQL sends an implicit transaction's rows before it
-- commits.
--
-- Plans: this statement runs on a connection of its own whose plan is made
-- once, without the parameters' values, from the statistics of that moment
-- (`db::claim_pool`), maybe of an empty table. So it is written to leave no
-- plan that reads more than the claimed rows: the queue is read only by the
-- ordered walk of events_pending_due up to the LIMIT (no other index holds
-- the due rows in this order, so any other plan would read them all and
-- sort); the endpoint and circuit are probed by primary key inside LATERAL
-- subqueries; the update finds its rows by primary key from an array. A join
-- of the claimed rows with outbox.events instead let the planner, believing
-- the table empty, walk all of it for every claim (measured: claims took
-- 20-85 ms after a few thousand deliveries).
WITH promoted AS (
    -- Retries set for later wait as `scheduled` (migration 0013); those
    -- come due go back to `pending`, at most 500 per claim, soonest first
    -- (claim_fair.sql, step 0). This statement's snapshot does not see
    -- them as pending yet: a `more` note has the loop claim again at once.
    UPDATE outbox.events AS e
       SET state = 'pending'
     WHERE e.id = ANY (ARRAY(
           SELECT s.id FROM outbox.events AS s
            WHERE s.state = 'scheduled' AND s.next_attempt_at <= now()
            ORDER BY s.next_attempt_at
            LIMIT 500
              FOR UPDATE SKIP LOCKED))
 RETURNING e.id
), due AS (
    SELECT e.id, e.company_id, e.event_type, e.next_attempt_at,
           e.lease_owner IS NOT NULL AS lease_expired
      FROM outbox.events AS e
     WHERE e.state = 'pending'
       AND e.next_attempt_at <= now()
       -- Checked in the walk, below the row locks: passed over, not locked.
       AND (e.company_id, e.event_type) NOT IN (
             SELECT s.company_id, s.event_type
               FROM unnest($8::bigint[], $9::text[]) AS s(company_id, event_type))
     ORDER BY e.next_attempt_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT d.id, d.company_id, d.event_type, d.lease_expired, d.next_attempt_at,
           row_number() OVER (PARTITION BY d.company_id, d.event_type
                              ORDER BY d.next_attempt_at, d.id) AS rn
      FROM due AS d
), judged AS (
    -- The endpoint and its circuit, each looked up by primary key (LATERAL
    -- with LIMIT 1 leaves the planner no other way in, whatever it thinks
    -- of the tables' sizes: see the note on plans above).
    SELECT r.id, r.company_id, r.event_type, r.lease_expired, r.next_attempt_at,
           coalesce(ci.failures > 0, false) AS circuit_dirty,
           ep.url, ep.auth_type, ep.username, ep.password, ep.token, ep.enabled,
           ep.signing_secrets, ep.destination,
           -- Held: a circuit that is not closed, or a Retry-After.
           NOT (ci.company_id IS NULL
                OR (ci.state = 'closed' AND (ci.paused_until IS NULL OR ci.paused_until <= now())))
               AS held,
           -- Ready for its probe: its cool-down is over (only the fair
           -- claim sends probes; see the `probe` note).
           coalesce(ci.state IN ('open', 'half_open') AND NOT ci.manual
                    AND ci.retry_at <= now()
                    AND (ci.paused_until IS NULL OR ci.paused_until <= now()), false)
               AS probe_ready,
           -- An endpoint's own max_in_flight counts for at most $13 (the
           -- settings screen may write up to 1,000).
           r.rn > least(coalesce(ep.max_in_flight, $4::int), $13::int) - coalesce(live.n, 0)
               AS full
      FROM ranked AS r
      LEFT JOIN LATERAL (
            SELECT x.url, x.auth_type, x.username, x.password, x.token, x.enabled, x.max_in_flight,
                   x.destination,
                   -- Its active signing secrets, newest first (none: unsigned).
                   ARRAY(SELECT s.secret FROM outbox.endpoint_signing_secrets AS s
                          WHERE s.company_id = x.company_id AND s.event_type = x.event_type
                            AND (s.expires_at IS NULL OR s.expires_at > now())
                          ORDER BY s.id DESC) AS signing_secrets
              FROM outbox.endpoints AS x
             WHERE x.company_id = r.company_id AND x.event_type = r.event_type
             LIMIT 1) AS ep ON true
      LEFT JOIN unnest($5::bigint[], $6::text[], $7::int[]) AS live(company_id, event_type, n)
             ON live.company_id = r.company_id AND live.event_type = r.event_type
      LEFT JOIN LATERAL (
            SELECT x.company_id, x.state, x.paused_until, x.failures, x.manual, x.retry_at
              FROM outbox.endpoint_circuits AS x
             WHERE x.company_id = r.company_id AND x.event_type = r.event_type
             LIMIT 1) AS ci ON true
), placed AS (
    -- The cap per destination: of the rows neither held nor full, each
    -- destination's oldest up to its room ($10/$11, or $12). The others
    -- are left like those of an endpoint at its cap.
    SELECT j.*,
           NOT j.held AND NOT j.full AND j.destination IS NOT NULL
           AND row_number() OVER (PARTITION BY j.destination, j.held OR j.full
                                  ORDER BY j.next_attempt_at, j.id)
               > coalesce((SELECT d.room
                             FROM unnest($10::text[], $11::int[]) AS d(destination, room)
                            WHERE d.destination = j.destination
                            LIMIT 1), $12::int) AS dest_full
      FROM judged AS j
), picked AS (
    SELECT j.* FROM placed AS j WHERE NOT j.held AND NOT j.full AND NOT j.dest_full
), left_behind AS (
    -- The endpoints whose rows were locked and left: held ones, and full
    -- ones (room on this instance used up, the endpoint's or, `destination`
    -- set, its destination's). Their due rows are counted
    -- afterwards by step_counts.sql, planned afresh each time: a count
    -- here would keep a plan made once, maybe on an empty table, and
    -- could walk every due row for each endpoint.
    SELECT j.company_id, j.event_type, bool_or(j.held) AS held,
           bool_or(j.probe_ready) AS probe_ready,
           -- At its destination's cap: the rows it could otherwise have
           -- sent were left for their destination, which is what has to
           -- free a place first (the rows past its own cap wait too).
           CASE WHEN bool_or(j.dest_full) AND NOT bool_or(j.held)
                THEN min(j.destination) END AS destination
      FROM placed AS j
     WHERE j.held OR j.full OR j.dest_full
     GROUP BY j.company_id, j.event_type
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
)
SELECT c.id, c.event_type, c.company_id, c.payload, c.attempts, c.attempts_since_replay,
       c.age_ms, p.lease_expired, false AS probe, p.circuit_dirty,
       -- due_at: what a failed probe puts back (claim_fair.sql); no probe here.
       NULL::timestamptz AS due_at,
       p.url, p.auth_type, p.username, p.password, p.token, p.enabled, p.signing_secrets,
       p.destination,
       -- worn_out: failed above, at the bound on attempts; not to be sent.
       CASE WHEN c.state = 'failed' THEN 'worn_out' END AS note
  FROM claimed AS c
  JOIN picked AS p ON p.id = c.id
UNION ALL
-- step: an endpoint whose rows this claim locked and left, held (circuit
-- open, half-open or paused, or a Retry-After) or at its cap, or at its
-- destination's (then named in `destination`). The next
-- plain claims step
-- over it ($8, $9), or the loop takes the fair claim for a while if there
-- are too many such rows or endpoints (src/pipeline/producer.rs, `Steps`).
SELECT NULL::uuid, l.event_type, l.company_id, NULL::text, NULL::int, NULL::int,
       NULL::bigint, NULL::bool, NULL::bool, NULL::bool, NULL::timestamptz,
       NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bool, NULL::text[],
       l.destination, CASE WHEN l.held THEN 'step_held' ELSE 'step_full' END
  FROM left_behind AS l
UNION ALL
-- probe: a row here belongs to an endpoint whose circuit's cool-down is
-- over, and only the fair claim sends probes: the loop makes the next
-- claim the fair one, with this note's key as its cursor: the endpoint
-- with pending rows just before the first such endpoint (one step back on
-- events_endpoint_pending; 0 and '' if none), so that its walk, which goes
-- on from the endpoint after its cursor, begins with it.
SELECT NULL::uuid, coalesce(b.event_type, ''), coalesce(b.company_id, 0), NULL::text, NULL::int,
       NULL::int, NULL::bigint, NULL::bool, NULL::bool, NULL::bool, NULL::timestamptz,
       NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bool, NULL::text[],
       NULL::text, 'probe'
  FROM (SELECT l.company_id, l.event_type
          FROM left_behind AS l
         WHERE l.probe_ready
         ORDER BY l.company_id, l.event_type
         LIMIT 1) AS p
  LEFT JOIN LATERAL (
        SELECT e.company_id, e.event_type
          FROM outbox.events AS e
         WHERE e.state = 'pending'
           AND (e.company_id, e.event_type) < (p.company_id, p.event_type)
         ORDER BY e.company_id DESC, e.event_type DESC
         LIMIT 1) AS b ON true
UNION ALL
-- more: retries came due (`promoted`), or rows were left behind from a
-- full window (more may be due behind it): claim again at once.
SELECT NULL::uuid, NULL::text, NULL::bigint, NULL::text, NULL::int, NULL::int,
       NULL::bigint, NULL::bool, NULL::bool, NULL::bool, NULL::timestamptz,
       NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bool, NULL::text[],
       NULL::text, 'more'
 WHERE EXISTS (SELECT 1 FROM promoted)
    OR ((SELECT count(*) FROM due) >= $1 AND (SELECT count(*) FROM picked) < $1)
