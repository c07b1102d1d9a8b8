-- claim_emails: lease the oldest due email to instance $1 for $2 ms. Due:
-- pending and next_attempt_at reached, or sending with the lease run out (its
-- mailer died). Like events, claiming increments attempts, the fence of the
-- mark that follows. One at a time: the lease is as long as sending one
-- email can take, and an email leased beside others would wait for them.
WITH due AS (
    SELECT id
      FROM outbox.emails
     WHERE state IN ('pending', 'sending')
       AND next_attempt_at <= now()
       -- One more try would overflow attempts (only a row written by hand
       -- gets there) and fail this statement for every email: such a row
       -- is left alone, still counted as queued (OutboxdNotificationsQueued).
       AND attempts < 2147483647
     ORDER BY next_attempt_at
     LIMIT 1
       FOR UPDATE SKIP LOCKED
)
UPDATE outbox.emails AS e
   SET state = 'sending',
       attempts = e.attempts + 1,
       lease_owner = $1,
       next_attempt_at = now() + $2::bigint * interval '1 millisecond'
  FROM due
 WHERE e.id = due.id
RETURNING e.id, e.company_id, e.event_type, e.recipients, e.sent_to, e.refused, e.attempts,
          e.kind, e.about::text AS about
