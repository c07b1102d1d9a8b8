-- circuits_record: what one group of written outcomes says about each of
-- its endpoints, applied to their circuit breakers (outbox.circuit_record,
-- migration 0005), one row per endpoint, in key order so that two
-- instances lock circuit rows in the same order and cannot deadlock.
-- Run after record.sql, only for a group with a retryable failure, a
-- Retry-After, or an endpoint whose circuit is not closed and clean: a
-- healthy endpoint's deliveries cost nothing here.
--
--  $1 bigint[]  company ids       $2 text[]  event types
--  $3 int[]     retryable failures in the group
--  $4 bool[]    the receiver answered with something not worth retrying
--  $5 bigint[]  the longest Retry-After of a 429 or 503, ms (NULL: none)
--  $6 text[]    the last failure
--  $7 int       [circuit] open_after    $8 bigint  cooldown, ms
--  $9 bigint    max_cooldown, ms        $10 bigint notify.window, ms
-- $11 text[]    what the endpoint's probe came to in the group: failed,
--               answered, other, or NULL (no probe in it); only it moves a
--               circuit that is not closed (migration 0012)
-- Returns each endpoint whose circuit changed: opened, reopened, closed.
SELECT t.company_id, t.event_type, t.change
  FROM (SELECT u.company_id, u.event_type,
               outbox.circuit_record(u.company_id, u.event_type, u.failed, u.answered,
                                     u.pause_ms, u.error, $7, $8, $9, $10, u.probe) AS change
          FROM unnest($1::bigint[], $2::text[], $3::int[], $4::bool[], $5::bigint[], $6::text[],
                      $11::text[])
               AS u(company_id, event_type, failed, answered, pause_ms, error, probe)
         ORDER BY u.company_id, u.event_type) AS t
 WHERE t.change IS NOT NULL
