-- events_list: `outboxd events list`, newest first. Every filter is
-- optional (NULL: no filter).
--
-- With a company, each state is read from an index that holds it by
-- company: delivered and failed events from events_company_settled, newest
-- first, stopping at the limit; pending ones from events_endpoint_pending;
-- leased ones from events_lease_expiry (the few in flight); scheduled ones
-- from events_scheduled. Without one,
-- the whole table is read (an operator's occasional look).
--
--  $1 bigint      company
--  $2 text        state: pending | scheduled | leased | delivered | failed
--  $3 timestamptz created at or after
--  $4 bigint      at most this many rows
WITH listed AS (
    (SELECT e.*
       FROM outbox.events AS e
      WHERE $1::bigint IS NOT NULL AND e.company_id = $1
        AND e.state IN ('delivered', 'failed')
        AND ($2::text IS NULL OR e.state = $2)
        AND ($3::timestamptz IS NULL OR e.created_at >= $3)
      ORDER BY e.created_at DESC, e.id DESC
      LIMIT $4)
    UNION ALL
    (SELECT e.*
       FROM outbox.events AS e
      WHERE $1::bigint IS NOT NULL AND e.company_id = $1
        AND e.state = 'pending'
        AND ($2::text IS NULL OR e.state = $2)
        AND ($3::timestamptz IS NULL OR e.created_at >= $3))
    UNION ALL
    (SELECT e.*
       FROM outbox.events AS e
      WHERE $1::bigint IS NOT NULL AND e.company_id = $1
        AND e.state = 'leased'
        AND ($2::text IS NULL OR e.state = $2)
        AND ($3::timestamptz IS NULL OR e.created_at >= $3))
    UNION ALL
    -- Retries set for later: every one read (events_scheduled holds them
    -- all, by time, not by company), few but for an outage.
    (SELECT e.*
       FROM outbox.events AS e
      WHERE $1::bigint IS NOT NULL AND e.company_id = $1
        AND e.state = 'scheduled'
        AND ($2::text IS NULL OR e.state = $2)
        AND ($3::timestamptz IS NULL OR e.created_at >= $3))
    UNION ALL
    (SELECT e.*
       FROM outbox.events AS e
      WHERE $1::bigint IS NULL
        AND ($2::text IS NULL OR e.state = $2)
        AND ($3::timestamptz IS NULL OR e.created_at >= $3)
      ORDER BY e.created_at DESC, e.id DESC
      LIMIT $4)
)
SELECT id, event_type, company_id, payload, state, attempts, next_attempt_at,
       lease_owner, created_at, delivered_at, response_message, last_error,
       replayed_at, attempts_at_replay
  FROM listed
 ORDER BY created_at DESC, id DESC
 LIMIT $4
