-- email_content: what an email reports: its first $2 failed events in full,
-- oldest failure first, each row also carrying how many events the email
-- reports in all and when the oldest of them was created (where a listing
-- of the rest starts). Reads $2 events in full whatever the email's size.
WITH listed AS (
    SELECT n.id, n.event_id, n.endpoint_url, n.created_at
      FROM outbox.notifications AS n
     WHERE n.email_id = $1
     ORDER BY n.created_at, n.id
     LIMIT $2
), whole AS (
    SELECT count(*) AS total, min(ev.created_at) AS since
      FROM outbox.notifications AS n
      JOIN outbox.events AS ev ON ev.id = n.event_id
     WHERE n.email_id = $1
)
SELECT ev.id, ev.event_type, ev.company_id, ev.payload::text AS payload, ev.attempts,
       ev.response_message, ev.last_error, l.endpoint_url,
       (SELECT min(a.started_at) FROM outbox.attempts AS a WHERE a.event_id = ev.id) AS first_attempt,
       (SELECT max(a.started_at) FROM outbox.attempts AS a WHERE a.event_id = ev.id) AS last_attempt,
       whole.total, whole.since
  FROM listed AS l
  JOIN outbox.events AS ev ON ev.id = l.event_id
 CROSS JOIN whole
 ORDER BY l.created_at, l.id
