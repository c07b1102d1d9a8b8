-- claim: lease up to $1 due events to the instance named $2 for $3
-- milliseconds, oldest first, and return each with its endpoint settings.
-- The same parameters and rows as claim_fair.sql: $4 is the cap per
-- endpoint on this instance (an endpoint's max_in_flight wins), and $5, $6,
-- $7 the endpoints this instance has requests in flight to, and how many.
--
-- The plain claim, for while no endpoint is held or at its cap, which is
-- when oldest first is fair too. It takes the $1 oldest due rows, as one
-- ordered walk of the partial index events_pending_due (FOR UPDATE SKIP
-- LOCKED lets several daemons claim side by side without queueing behind
-- each other's row locks), and leases those whose endpoint has room and no
-- held circuit. When it leaves any behind, a `note` row says so and the
-- claim loop takes claim_fair.sql from then on: rows of a held endpoint in
-- front of the queue would otherwise be walked by every claim.
--
-- Due: pending with next_attempt_at reached. A row whose lease ran out (its
-- daemon died mid-delivery) is put back to pending by release_expired.sql,
-- keeping its lease_owner: that is how `lease_expired` is known here.
-- Claiming increments `attempts`, which fences every later update of this
-- delivery (record.sql). The statement commits on its own, before any HTTP
-- request is made.
WITH due AS (
    SELECT e.id, e.company_id, e.event_type, e.next_attempt_at,
           e.lease_owner IS NOT NULL AS lease_expired
      FROM outbox.events AS e
     WHERE e.state = 'pending'
       AND e.next_attempt_at <= now()
     ORDER BY e.next_attempt_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT d.id, d.company_id, d.event_type, d.lease_expired,
           row_number() OVER (PARTITION BY d.company_id, d.event_type
                              ORDER BY d.next_attempt_at, d.id) AS rn
      FROM due AS d
), picked AS (
    SELECT r.id, r.lease_expired, coalesce(ci.failures > 0, false) AS circuit_dirty,
           ep.url, ep.auth_type, ep.username, ep.password, ep.token, ep.enabled
      FROM ranked AS r
      LEFT JOIN outbox.endpoints AS ep
             ON ep.company_id = r.company_id AND ep.event_type = r.event_type
      LEFT JOIN unnest($5::bigint[], $6::text[], $7::int[]) AS live(company_id, event_type, n)
             ON live.company_id = r.company_id AND live.event_type = r.event_type
      LEFT JOIN outbox.endpoint_circuits AS ci
             ON ci.company_id = r.company_id AND ci.event_type = r.event_type
     WHERE r.rn <= coalesce(ep.max_in_flight, $4::int) - coalesce(live.n, 0)
       -- Not held: no circuit, or a closed one that no Retry-After pauses.
       AND (ci.company_id IS NULL
            OR (ci.state = 'closed' AND (ci.paused_until IS NULL OR ci.paused_until <= now())))
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
           picked.lease_expired, picked.circuit_dirty,
           picked.url, picked.auth_type, picked.username, picked.password, picked.token,
           picked.enabled
)
SELECT c.id, c.event_type, c.company_id, c.payload, c.attempts, c.attempts_since_replay,
       c.age_ms, c.lease_expired, false AS probe, c.circuit_dirty,
       c.url, c.auth_type, c.username, c.password, c.token, c.enabled, NULL::text AS note
  FROM claimed AS c
UNION ALL
-- held: due rows were left behind, of an endpoint at its cap or held.
-- (A held endpoint's rows come to the front of the queue in time, and the
-- fair claim that follows sends its probe.)
SELECT NULL::uuid, NULL::text, NULL::bigint, NULL::text, NULL::int, NULL::int,
       NULL::bigint, NULL::bool, NULL::bool, NULL::bool,
       NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bool, 'held'
 WHERE (SELECT count(*) FROM due) > (SELECT count(*) FROM picked)
