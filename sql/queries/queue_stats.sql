-- queue_stats: the gauges, in one statement. Every part reads only a partial
-- index of rows still in flight (events_due, emails_due,
-- notifications_waiting), so the cost follows the backlog, not the history.
SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
       count(*) FILTER (WHERE state = 'leased') AS leased,
       coalesce((extract(epoch FROM now() - min(created_at) FILTER (WHERE next_attempt_at <= now()))
                 * 1000)::bigint, 0) AS oldest_due_age_ms,
       (SELECT count(*) FROM outbox.emails WHERE state IN ('pending', 'sending'))
     + (SELECT count(*) FROM outbox.notifications WHERE email_id IS NULL) AS emails_queued
  FROM outbox.events
 WHERE state IN ('pending', 'leased')
