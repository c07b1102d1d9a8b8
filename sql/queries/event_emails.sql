-- event_emails: who was (or will be) told that one event failed. A
-- notification not yet gathered into an email has no email columns.
--
--  $1 uuid  event id
SELECT n.created_at AS reported_at, m.id AS email_id, m.state AS email_state,
       m.recipients, m.sent_to, m.refused, m.sent_at, m.last_error
  FROM outbox.notifications AS n
  LEFT JOIN outbox.emails AS m ON m.id = n.email_id
 WHERE n.event_id = $1
 ORDER BY n.id
