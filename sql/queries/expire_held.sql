-- expire_held: fail up to $2 events that a circuit which is not closed (an
-- endpoint found down, or paused by an operator or by its company) has held for more than
-- $1 ms past their due time, and queue an error notification for each, as
-- for any event that fails for good after real attempts. $3 is the limit as
-- people read it ("1day"), for the recorded reason.
--
-- Held events are never claimed, so without this an endpoint that stays
-- down would keep its events waiting, unseen, for ever. Due time and not
-- creation: an event cannot come due before it was created, so the
-- endpoint's range of events_endpoint_pending below the cutoff is the
-- rows to fail, read without touching the rest of a large held backlog.
-- Returns how many were failed.
WITH held AS (
    SELECT c.company_id, c.event_type, c.opened_at, c.manual, c.last_error
      FROM outbox.endpoint_circuits AS c
     WHERE c.state <> 'closed'
), doomed AS (
    SELECT d.id, h.opened_at, h.manual, h.last_error
      FROM held AS h
     CROSS JOIN LATERAL (
           SELECT e.id
             FROM outbox.events AS e
            WHERE e.company_id = h.company_id AND e.event_type = h.event_type
              AND e.state = 'pending'
              AND e.next_attempt_at < now() - $1::bigint * interval '1 millisecond'
            ORDER BY e.next_attempt_at
            LIMIT $2
              FOR UPDATE SKIP LOCKED) AS d
     LIMIT $2
), failed AS (
    UPDATE outbox.events AS e
       SET state = 'failed',
           lease_owner = NULL,
           last_error = CASE
               -- 'paused by an operator' or 'paused by the company'.
               WHEN d.manual THEN format('held for more than %s: the endpoint is %s', $3::text,
                                         coalesce(d.last_error, 'paused'))
               ELSE format('held for more than %s: the endpoint has not been reachable since %s; last error: %s',
                           $3::text, to_char(d.opened_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'),
                           coalesce(d.last_error, e.last_error, 'unknown'))
           END
      FROM doomed AS d
     WHERE e.id = d.id
 RETURNING e.id, e.company_id, e.event_type
), notified AS (
    INSERT INTO outbox.notifications (event_id, company_id, event_type, endpoint_url)
    SELECT f.id, f.company_id, f.event_type, ep.url
      FROM failed AS f
      JOIN outbox.endpoints AS ep
        ON ep.company_id = f.company_id AND ep.event_type = f.event_type
     WHERE cardinality(ep.notify_emails) > 0
)
SELECT count(*) AS failed FROM failed
