-- secret_list: the signing secrets of the endpoint of company $1 for event
-- type $2, newest first. The CLI shows fingerprints, never the secret.
SELECT secret, created_at, expires_at,
       (expires_at IS NULL OR expires_at > now()) AS active
  FROM outbox.endpoint_signing_secrets
 WHERE company_id = $1 AND event_type = $2
 ORDER BY id DESC
