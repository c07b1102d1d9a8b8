-- secret_rotate: give the endpoint of company $1 for event type $2 the new
-- signing secret $3. Its secrets still active stay valid for $4 ms more (0:
-- they end now), so that a receiver switching to the new one loses nothing;
-- meanwhile every request carries both signatures. Returns when the old
-- ones end (NULL when there were none), or no row for no such endpoint.
WITH endpoint AS (
    SELECT company_id, event_type
      FROM outbox.endpoints
     WHERE company_id = $1 AND event_type = $2
       FOR UPDATE
), ending AS (
    UPDATE outbox.endpoint_signing_secrets AS s
       SET expires_at = least(coalesce(s.expires_at, 'infinity'),
                              now() + $4::bigint * interval '1 millisecond')
      FROM endpoint AS e
     WHERE s.company_id = e.company_id AND s.event_type = e.event_type
       AND (s.expires_at IS NULL OR s.expires_at > now())
 RETURNING s.expires_at
), added AS (
    INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
    SELECT company_id, event_type, $3 FROM endpoint
 RETURNING id
)
SELECT (SELECT max(expires_at) FROM ending) AS old_until FROM added
