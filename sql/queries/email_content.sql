-- email_content: what an email reports, one row per failed event, oldest first.
SELECT ev.id, ev.event_type, ev.company_id, ev.payload::text AS payload, ev.attempts,
       ev.response_message, ev.last_error, n.endpoint_url,
       (SELECT min(a.started_at) FROM outbox.attempts AS a WHERE a.event_id = ev.id) AS first_attempt,
       (SELECT max(a.started_at) FROM outbox.attempts AS a WHERE a.event_id = ev.id) AS last_attempt
  FROM outbox.notifications AS n
  JOIN outbox.events AS ev ON ev.id = n.event_id
 WHERE n.email_id = $1
 ORDER BY n.created_at, n.id
