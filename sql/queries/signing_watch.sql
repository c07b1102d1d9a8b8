-- signing_watch: endpoints that have had a signing secret
-- (outbox.signed_endpoints) and have no active one now, because their
-- secrets all expired or were deleted. Such an endpoint's requests go out
-- unsigned; this statement notices the change once (unsigned_since, set
-- under the row's lock, so of several instances exactly one does), queues
-- one 'signing_stopped' email to the endpoint's notify_emails (none if one
-- was queued for it within $1 ms, the notification window, so a secret
-- that flaps does not flood anyone), and clears the mark when the
-- endpoint has an active secret again. Endpoints whose row is gone are
-- left alone: their events fail as no_endpoint and there is nobody to
-- tell.
--
-- Returns one row per change ('stopped', with why and whether an email
-- was queued; 'resumed'), then a 'total' row: how many endpoints are in
-- that state now. Reads signed_endpoints whole (endpoints that sign, a
-- small table) with the endpoint and its secrets by key.
WITH state AS (
    SELECT m.company_id, m.event_type, m.unsigned_since, ep.url, ep.notify_emails,
           EXISTS (SELECT 1 FROM outbox.endpoint_signing_secrets AS s
                    WHERE s.company_id = m.company_id AND s.event_type = m.event_type
                      AND (s.expires_at IS NULL OR s.expires_at > now())) AS signs,
           -- When its last secret expired; NULL when it has none at all.
           (SELECT max(s.expires_at) FROM outbox.endpoint_signing_secrets AS s
             WHERE s.company_id = m.company_id AND s.event_type = m.event_type) AS expired_at
      FROM outbox.signed_endpoints AS m
      JOIN outbox.endpoints AS ep
        ON ep.company_id = m.company_id AND ep.event_type = m.event_type
), stopped AS (
    UPDATE outbox.signed_endpoints AS m
       SET unsigned_since = coalesce(s.expired_at, now())
      FROM state AS s
     WHERE m.company_id = s.company_id AND m.event_type = s.event_type
       AND NOT s.signs
       AND m.unsigned_since IS NULL
 RETURNING m.company_id, m.event_type, m.unsigned_since,
           CASE WHEN s.expired_at IS NULL THEN 'removed' ELSE 'expired' END AS why,
           s.url, s.notify_emails
), resumed AS (
    UPDATE outbox.signed_endpoints AS m
       SET unsigned_since = NULL
      FROM state AS s
     WHERE m.company_id = s.company_id AND m.event_type = s.event_type
       AND s.signs
       AND m.unsigned_since IS NOT NULL
 RETURNING m.company_id, m.event_type
), emailed AS (
    INSERT INTO outbox.emails (company_id, event_type, recipients, kind, about)
    SELECT st.company_id, st.event_type, st.notify_emails, 'signing_stopped',
           jsonb_build_object(
               'url', st.url,
               'since', to_char(st.unsigned_since AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
               'why', st.why)
      FROM stopped AS st
     WHERE cardinality(st.notify_emails) > 0
       AND NOT EXISTS (
               SELECT 1 FROM outbox.emails AS e
                WHERE e.company_id = st.company_id AND e.event_type = st.event_type
                  AND e.kind = 'signing_stopped'
                  AND e.created_at > now() - $1::bigint * interval '1 millisecond')
 RETURNING company_id, event_type
)
SELECT 'stopped' AS change, st.company_id, st.event_type, st.why,
       EXISTS (SELECT 1 FROM emailed AS e
                WHERE e.company_id = st.company_id AND e.event_type = st.event_type) AS emailed,
       NULL::bigint AS unsigned
  FROM stopped AS st
UNION ALL
SELECT 'resumed', r.company_id, r.event_type, NULL, NULL, NULL
  FROM resumed AS r
UNION ALL
SELECT 'total', NULL, NULL, NULL, NULL, count(*)
  FROM state AS s
 WHERE NOT s.signs
