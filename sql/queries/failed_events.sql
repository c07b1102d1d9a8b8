-- failed_events: the failed events of one company, oldest first (from
-- events_company_settled), for
-- `outboxd events retry --company ID --state failed`; replay.sql then moves
-- them.
--
--  $1 bigint       company
--  $2 timestamptz  created at or after (NULL: any time)
SELECT id
  FROM outbox.events
 WHERE company_id = $1
   AND state = 'failed'
   AND ($2::timestamptz IS NULL OR created_at >= $2)
 ORDER BY created_at, id
