-- retention: delete up to $4 finished events older than their retention
-- ($1 ms after delivery for delivered events, $2 ms after creation or the
-- last replay for failed ones), up to $4 sent emails older than $3 ms, and
-- up to $4 signing secrets expired for longer than $1 ms (as long as a
-- delivery's record is kept, `outboxd endpoint secret list` still shows
-- which secrets could have signed it, and an operator who ended one by
-- mistake can bring it back; after that an expired secret serves nothing
-- and is only something that can leak). Attempt rows and notifications go
-- with their events (ON DELETE CASCADE). SKIP LOCKED: several instances
-- may run this at once without waiting on each other. Returns how many
-- events, emails and secrets were deleted.
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
), old_secrets AS (
    -- A small table (a few rows per signing endpoint): read whole.
    SELECT id FROM outbox.endpoint_signing_secrets
     WHERE expires_at < now() - $1::bigint * interval '1 millisecond'
     ORDER BY expires_at
     LIMIT $4
       FOR UPDATE SKIP LOCKED
), secrets_gone AS (
    DELETE FROM outbox.endpoint_signing_secrets AS s USING old_secrets AS o WHERE s.id = o.id
 RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS events, (SELECT count(*) FROM emails_gone) AS emails,
       (SELECT count(*) FROM secrets_gone) AS secrets
