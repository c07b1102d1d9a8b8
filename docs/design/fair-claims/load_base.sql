-- :ncomp companies (ids 1..:ncomp), ~30 due events each (last hour), 2 live leases and 3 future retries each.
-- Companies whose id % 30 = 0 get NO endpoints row (daemon must still claim them to fail them as no_endpoint).
INSERT INTO outbox.endpoints (company_id, event_type, url)
SELECT c, 'payment.cancellation', 'https://c' || c || '.example.com/hook'
  FROM generate_series(1, :ncomp) AS c WHERE c % 30 <> 0;
INSERT INTO outbox.events (company_id, event_type, payload, next_attempt_at, created_at)
SELECT c, 'payment.cancellation',
       jsonb_build_object('companyId', c, 'paymentId', c * 1000 + i, 'paymentNumber', 'P-' || i),
       now() - random() * interval '1 hour', now() - interval '1 hour'
  FROM generate_series(1, :ncomp) AS c, generate_series(1, 30) AS i;
-- live leases (in flight on some instance) and scheduled retries: not due
INSERT INTO outbox.events (company_id, event_type, payload, state, attempts, lease_owner, next_attempt_at)
SELECT c, 'payment.cancellation', jsonb_build_object('companyId', c, 'paymentId', c * 1000 + 900 + i, 'paymentNumber', 'L'),
       'leased', 1, 'other-instance', now() + interval '1 day'
  FROM generate_series(1, :ncomp) AS c, generate_series(1, 2) AS i;
INSERT INTO outbox.events (company_id, event_type, payload, state, attempts, next_attempt_at)
SELECT c, 'payment.cancellation', jsonb_build_object('companyId', c, 'paymentId', c * 1000 + 950 + i, 'paymentNumber', 'R'),
       'pending', 1, now() + interval '1 day'
  FROM generate_series(1, :ncomp) AS c, generate_series(1, 3) AS i;
