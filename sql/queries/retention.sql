-- retention: delete up to $4 finished events older than their retention
-- ($1 ms after delivery for delivered events, $2 ms after creation or the
-- last replay for failed ones) and up to $4 sent emails older than $3 ms.
-- Attempt rows and notifications go with their events (ON DELETE CASCADE).
-- SKIP LOCKED: several instances may run this at once without waiting on
-- each other. Returns how many events and emails were deleted.
WITH delivered AS (
    SELECT id FROM outbox.events
     WHERE state = 'delivered'
       AND delivered_at < now() - $1::bigint * interval '1 millisecond'
     ORDER BY delivered_at
     LIMIT $4
       FOR UPDATE SKIP LOCKED
), failed AS (
    SELECT id FROM outbox.events
     WHERE state = 'failed'
       AND coalesce(replayed_at, created_at) < now() - $2::bigint * interval '1 millisecond'
     ORDER BY coalesce(replayed_at, created_at)
     LIMIT $4
       FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM outbox.events AS e
     WHERE e.id IN (SELECT id FROM delivered UNION ALL SELECT id FROM failed)
 RETURNING 1
), old_emails AS (
    SELECT id FROM outbox.emails
     WHERE state = 'sent' AND sent_at < now() - $3::bigint * interval '1 millisecond'
     ORDER BY sent_at
     LIMIT $4
       FOR UPDATE SKIP LOCKED
), emails_gone AS (
    DELETE FROM outbox.emails AS m USING old_emails AS o WHERE m.id = o.id
 RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS events, (SELECT count(*) FROM emails_gone) AS emails
