-- Fairness demo: company 1 enqueues 100,000 events in one burst; 1 s later company 2 enqueues one event.
INSERT INTO outbox.endpoints (company_id, event_type, url) VALUES (1, 'payment.cancellation', 'https://c1.example.com/h'), (2, 'payment.cancellation', 'https://c2.example.com/h');
INSERT INTO outbox.events (company_id, payload, next_attempt_at, created_at)
SELECT 1, jsonb_build_object('companyId', 1, 'paymentId', g, 'paymentNumber', 'B'), now() - interval '10 s', now() - interval '10 s'
  FROM generate_series(1, 100000) g;
INSERT INTO outbox.events (company_id, payload, next_attempt_at, created_at)
VALUES (2, '{"companyId": 2, "paymentId": 1, "paymentNumber": "S"}', now() - interval '9 s', now() - interval '9 s');
VACUUM ANALYZE outbox.events;
