-- 1,000,000 due events of company 6316 (endpoint held), all OLDER than every other due row: worst case for oldest-first.
INSERT INTO outbox.endpoints (company_id, event_type, url) VALUES (6316, 'payment.cancellation', 'https://held.example.com/hook')
    ON CONFLICT DO NOTHING;
INSERT INTO outbox.events (company_id, event_type, payload, next_attempt_at, created_at)
SELECT 6316, 'payment.cancellation',
       jsonb_build_object('companyId', 6316, 'paymentId', g, 'paymentNumber', 'P-' || g),
       now() - interval '3 hours' + g * interval '5 milliseconds',
       now() - interval '3 hours' + g * interval '5 milliseconds'
  FROM generate_series(1, 1000000) AS g;
INSERT INTO outbox.held_endpoints VALUES (6316, 'payment.cancellation') ON CONFLICT DO NOTHING;
