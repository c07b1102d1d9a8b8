-- failure_ratio: of the attempts in the last hour that finished their event,
-- how many finished it as failed. An attempt finishes its event when its
-- outcome is final (success, rejected, permanent, no_endpoint), or when it
-- was retryable but the retries ran out: it is the failed event's last
-- attempt. Retries still to come are not counted either way.
SELECT count(*) AS finished,
       count(*) FILTER (WHERE a.outcome <> 'success') AS failed
  FROM outbox.attempts AS a
  JOIN outbox.events AS e ON e.id = a.event_id
 WHERE a.started_at >= now() - interval '1 hour'
   AND (a.outcome <> 'retryable' OR (e.state = 'failed' AND a.attempt = e.attempts))
