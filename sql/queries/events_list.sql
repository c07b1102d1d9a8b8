-- events_list: `outboxd events list`, newest first. Every filter is
-- optional (NULL: no filter); with a company, the index
-- events_company_created serves both the filter and the order.
--
--  $1 bigint      company
--  $2 text        state: pending | leased | delivered | failed
--  $3 timestamptz created at or after
--  $4 bigint      at most this many rows
SELECT id, event_type, company_id, payload, state, attempts, next_attempt_at,
       lease_owner, created_at, delivered_at, response_message, last_error,
       replayed_at, attempts_at_replay
  FROM outbox.events
 WHERE ($1::bigint IS NULL OR company_id = $1)
   AND ($2::text IS NULL OR state = $2)
   AND ($3::timestamptz IS NULL OR created_at >= $3)
 ORDER BY created_at DESC, id DESC
 LIMIT $4
