-- event_counts: events per state, for `outboxd status`. Counts the whole
-- table (delivered history included), so it costs a scan: fine for an
-- operator's command, which is why the gauges use queue_stats.sql instead.
SELECT state, count(*) AS events
  FROM outbox.events
 GROUP BY state
