-- secret_clear: the endpoint of company $1 for event type $2 stops signing
-- on purpose (`outboxd endpoint secret clear`): its signing secrets are
-- deleted, and so is the record that it signed (outbox.signed_endpoints),
-- so that it is not reported as an endpoint left without a secret.
-- Returns how many secrets went and whether it was recorded as signing.
WITH secrets AS (
    DELETE FROM outbox.endpoint_signing_secrets
     WHERE company_id = $1 AND event_type = $2
 RETURNING 1
), signed AS (
    DELETE FROM outbox.signed_endpoints
     WHERE company_id = $1 AND event_type = $2
 RETURNING 1
)
SELECT (SELECT count(*) FROM secrets) AS secrets, EXISTS (SELECT 1 FROM signed) AS signed
