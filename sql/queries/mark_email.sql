-- mark_email: record one send attempt of email $1 claimed at attempt $2.
-- Fenced like record.sql: applies only while this mailer still holds the
-- lease. Done (sent) when every recipient is in sent_to or refused; otherwise
-- pending again after $5 ms.
UPDATE outbox.emails
   SET sent_to = $3::text[],
       refused = $4::text[],
       state = CASE WHEN recipients <@ ($3::text[] || $4::text[]) THEN 'sent' ELSE 'pending' END,
       sent_at = CASE WHEN recipients <@ ($3::text[] || $4::text[]) THEN now() END,
       next_attempt_at = CASE WHEN recipients <@ ($3::text[] || $4::text[]) THEN next_attempt_at
                              ELSE now() + $5::bigint * interval '1 millisecond' END,
       last_error = $6,
       lease_owner = NULL
 WHERE id = $1 AND state = 'sending' AND attempts = $2
RETURNING state
