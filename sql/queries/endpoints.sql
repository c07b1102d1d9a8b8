-- endpoints: endpoint settings as `outboxd endpoint list` and `show` print
-- them. The secrets never leave the database: only whether each is set.
--
--  $1 bigint  company (NULL: every company)
--  $2 text    event type (NULL: every event type)
SELECT company_id, event_type, url, auth_type, username,
       coalesce(password, '') <> '' AS password_set,
       coalesce(token, '') <> '' AS token_set,
       notify_emails, enabled, created_at, updated_at
  FROM outbox.endpoints
 WHERE ($1::bigint IS NULL OR company_id = $1)
   AND ($2::text IS NULL OR event_type = $2)
 ORDER BY company_id, event_type
