-- secret_replace: the endpoint of company $1 for event type $2 signs with
-- the secret $3 only (`outboxd endpoint set --signing-secret-file`).
WITH removed AS (
    DELETE FROM outbox.endpoint_signing_secrets
     WHERE company_id = $1 AND event_type = $2
)
INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
VALUES ($1, $2, $3)
