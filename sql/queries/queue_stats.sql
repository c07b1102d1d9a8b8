-- queue_stats: the gauges, in one statement. Every part reads only a partial
-- index of rows still in flight (events_due, emails_due,
-- notifications_waiting), so the cost follows the backlog, not the history.
--
-- The age is computed outside the aggregate so that a created_at of
-- '-infinity' (as old as can be) or 'infinity' (new), which a row written by
-- hand may carry and which cannot be subtracted, does not fail the query.
-- Nothing due (NULL) gives 0.
SELECT q.pending, q.leased,
       CASE WHEN isfinite(q.oldest_due) THEN (extract(epoch FROM now() - q.oldest_due) * 1000)::bigint
            WHEN q.oldest_due < now() THEN 9223372036854775807
            ELSE 0 END AS oldest_due_age_ms,
       q.emails_queued
  FROM (SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
               count(*) FILTER (WHERE state = 'leased') AS leased,
               min(created_at) FILTER (WHERE next_attempt_at <= now()) AS oldest_due,
               (SELECT count(*) FROM outbox.emails WHERE state IN ('pending', 'sending'))
             + (SELECT count(*) FROM outbox.notifications WHERE email_id IS NULL) AS emails_queued
          FROM outbox.events
         WHERE state IN ('pending', 'leased')) AS q
