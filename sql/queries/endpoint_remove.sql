-- endpoint_remove: `outboxd endpoint remove` deletes the endpoint of company
-- $1 for event type $2 with all its settings: its signing secrets, which
-- since 0010 are not deleted with the row (so that a settings screen's
-- delete and re-insert keeps them), and the record that it signs
-- (outbox.signed_endpoints), so that nothing reports it as having stopped
-- signing. Returns a row for the endpoint deleted, none when there was none.
WITH secrets AS (
    DELETE FROM outbox.endpoint_signing_secrets
     WHERE company_id = $1 AND event_type = $2
), signed AS (
    DELETE FROM outbox.signed_endpoints
     WHERE company_id = $1 AND event_type = $2
)
DELETE FROM outbox.endpoints
 WHERE company_id = $1 AND event_type = $2
