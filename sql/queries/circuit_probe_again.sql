-- circuit_probe_again: the probes of these endpoints ($1 company ids, $2
-- event types) were refused before they were sent (the endpoint disabled or
-- missing, a destination outboxd may not reach, a payload it cannot send)
-- or answered with a 4xx about the event itself (400, 422), so they say
-- nothing of whether the endpoint is back. Each such circuit
-- goes back to open, due for a probe at once, instead of staying half-open
-- for a lease with no probe out: the next claim probes with another of its
-- events. Only a circuit still half-open: its probe was this one (one
-- probe at a time per circuit).
UPDATE outbox.endpoint_circuits AS c
   SET state = 'open', retry_at = now()
  FROM unnest($1::bigint[], $2::text[]) AS k(company_id, event_type)
 WHERE c.company_id = k.company_id AND c.event_type = k.event_type
   AND c.state = 'half_open'
