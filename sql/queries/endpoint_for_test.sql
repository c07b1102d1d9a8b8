-- An endpoint as `outboxd endpoint test` sends to it: where and how, and its
-- active signing secrets newest first (as the claim returns them).
-- $1 company_id, $2 event_type.
SELECT url, auth_type, username, password, token, enabled,
       ARRAY(SELECT s.secret FROM outbox.endpoint_signing_secrets AS s
              WHERE s.company_id = e.company_id AND s.event_type = e.event_type
                AND (s.expires_at IS NULL OR s.expires_at > now())
              ORDER BY s.id DESC) AS signing_secrets
  FROM outbox.endpoints AS e
 WHERE company_id = $1 AND event_type = $2
