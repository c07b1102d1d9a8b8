-- failing_endpoints: the endpoints with the most events that failed in the
-- last 24 hours (their last attempt started then, and they are still
-- failed: a replayed event no longer counts). Events without an endpoint
-- show with a NULL url.
--
--  $1 bigint  how many endpoints
SELECT e.company_id, e.event_type, ep.url, count(*) AS failed
  FROM outbox.events AS e
  JOIN outbox.attempts AS a ON a.event_id = e.id AND a.attempt = e.attempts
  LEFT JOIN outbox.endpoints AS ep
         ON ep.company_id = e.company_id AND ep.event_type = e.event_type
 WHERE e.state = 'failed'
   AND a.started_at >= now() - interval '24 hours'
 GROUP BY e.company_id, e.event_type, ep.url
 ORDER BY failed DESC, e.company_id, e.event_type
 LIMIT $1
