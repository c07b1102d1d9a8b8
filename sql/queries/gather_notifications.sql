-- gather_notifications: turn waiting notifications into emails, at most one
-- email per endpoint per window ($2 ms). An endpoint's notifications are
-- gathered once the oldest has waited $1 ms (so a burst of failures makes one
-- digest, not one email each) and no email for that endpoint was created
-- within the window. Returns the new emails.
--
-- Run only by the instance holding the gather lock, in the same transaction
-- and after the statement that took it (src/store/mail.rs): so two instances
-- never gather at once, and this statement's snapshot, taken after the
-- lock, sees what the previous holder committed. (Taken inside this
-- statement, the lock came after its snapshot: an instance could get it
-- just as another committed, then see that one's notifications as still
-- waiting and make an email with none in it.)
WITH ready AS (
    SELECT n.company_id, n.event_type
      FROM outbox.notifications AS n
     WHERE n.email_id IS NULL
     GROUP BY n.company_id, n.event_type
    HAVING min(n.created_at) <= now() - $1::bigint * interval '1 millisecond'
       AND NOT EXISTS (
               SELECT 1 FROM outbox.emails AS e
                WHERE e.company_id = n.company_id AND e.event_type = n.event_type
                  AND e.kind = 'failures'
                  AND e.created_at > now() - $2::bigint * interval '1 millisecond')
), created AS (
    INSERT INTO outbox.emails (company_id, event_type, recipients)
    SELECT r.company_id, r.event_type, ep.notify_emails
      FROM ready AS r
      JOIN outbox.endpoints AS ep
        ON ep.company_id = r.company_id AND ep.event_type = r.event_type
     WHERE cardinality(ep.notify_emails) > 0
 RETURNING id, company_id, event_type
), assigned AS (
    UPDATE outbox.notifications AS n
       SET email_id = c.id
      FROM created AS c
     WHERE n.company_id = c.company_id AND n.event_type = c.event_type
       AND n.email_id IS NULL
 RETURNING n.email_id
), orphaned AS (
    -- The endpoint was removed or its addresses cleared since the failure:
    -- nobody to tell. Dropped so they are not looked at on every tick.
    DELETE FROM outbox.notifications AS n
     USING ready AS r
     WHERE n.company_id = r.company_id AND n.event_type = r.event_type
       AND n.email_id IS NULL
       AND NOT EXISTS (SELECT 1 FROM outbox.endpoints AS ep
                        WHERE ep.company_id = r.company_id AND ep.event_type = r.event_type
                          AND cardinality(ep.notify_emails) > 0)
)
SELECT email_id AS id, count(*) AS notifications FROM assigned GROUP BY email_id
