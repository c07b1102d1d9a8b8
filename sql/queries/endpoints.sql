-- endpoints: endpoint settings as `outboxd endpoint list` and `show` print
-- them, with the state of each one's circuit breaker. The secrets never
-- leave the database: only whether each is set.
--
--  $1 bigint  company (NULL: every company)
--  $2 text    event type (NULL: every event type)
SELECT ep.company_id, ep.event_type, ep.url, ep.auth_type, ep.username,
       coalesce(ep.password, '') <> '' AS password_set,
       coalesce(ep.token, '') <> '' AS token_set,
       ep.notify_emails, ep.enabled, ep.created_at, ep.updated_at, ep.max_in_flight,
       coalesce(ci.state, 'closed') AS circuit, ci.manual, ci.opened_at,
       CASE WHEN isfinite(ci.retry_at) THEN ci.retry_at END AS retry_at,
       CASE WHEN ci.paused_until > now() THEN ci.paused_until END AS paused_until,
       coalesce(ci.failures, 0) AS failures, ci.last_error
  FROM outbox.endpoints AS ep
  LEFT JOIN outbox.endpoint_circuits AS ci
         ON ci.company_id = ep.company_id AND ci.event_type = ep.event_type
 WHERE ($1::bigint IS NULL OR ep.company_id = $1)
   AND ($2::text IS NULL OR ep.event_type = $2)
 ORDER BY ep.company_id, ep.event_type
