-- endpoint_upsert: `outboxd endpoint set`, which replaces the whole endpoint
-- of a company and event type. Secrets the auth type does not use are
-- cleared (the caller passes NULL for them), so switching from basic to
-- bearer leaves no stale password behind. The trigger
-- outbox.endpoints_validate checks the row again and sets updated_at.
-- Returns whether the row was created; the caller reads it back with
-- endpoints.sql.
--
--  $1 bigint  company      $2 text event type    $3 text url
--  $4 text    auth_type    $5 text username      $6 text password
--  $7 text    token        $8 text[] notify_emails
--  $9 bool    enabled      $10 int max_in_flight (NULL: the daemon's default)
INSERT INTO outbox.endpoints AS ep
       (company_id, event_type, url, auth_type, username, password, token, notify_emails, enabled,
        max_in_flight)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (company_id, event_type) DO UPDATE
   SET url = EXCLUDED.url,
       auth_type = EXCLUDED.auth_type,
       username = EXCLUDED.username,
       password = EXCLUDED.password,
       token = EXCLUDED.token,
       notify_emails = EXCLUDED.notify_emails,
       enabled = EXCLUDED.enabled,
       max_in_flight = EXCLUDED.max_in_flight
-- xmax is 0 on a freshly inserted row version, set on an update.
RETURNING xmax = 0 AS inserted
