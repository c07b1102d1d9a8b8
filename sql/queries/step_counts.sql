-- step_counts: the pending rows of each endpoint the plain claim locked and
-- left ($1 company ids, $2 event types), each counted up to $3 (one per
-- endpoint), so the claim loop knows what stepping over them would cost
-- (src/pipeline/producer.rs, `Steps`). Pending rows are due since
-- migration 0013.
--
-- A statement of its own on the pool whose plans are made afresh at each
-- run, from the statistics of the moment: in claim.sql, whose plan is kept
-- for the life of its connection, a plan made on an empty table could
-- walk events_pending_due, every due row, for each endpoint. Here a large
-- table has each endpoint counted from its own range of
-- events_endpoint_pending.
SELECT k.company_id, k.event_type,
       (SELECT count(*)::int
          FROM (SELECT 1
                  FROM outbox.events AS e
                 WHERE e.company_id = k.company_id AND e.event_type = k.event_type
                   AND e.state = 'pending'
                 LIMIT k.up_to) AS w) AS pending
  FROM unnest($1::bigint[], $2::text[], $3::int[]) AS k(company_id, event_type, up_to)
