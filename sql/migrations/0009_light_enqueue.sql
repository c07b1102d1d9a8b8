-- 0009: a light guest in the sales application's transactions.
--
-- The enqueue runs inside the application's own transactions, so what it
-- costs them is part of the product. Measured against a bare outbox insert
-- (docs/BENCHMARKS.md, "Issue 22"), three things made it heavy:
--
-- 1. The wake-up. events_notify sent a NOTIFY from every enqueuing
--    transaction. PostgreSQL takes one lock for the whole instance when
--    such a transaction commits (in PreCommit_Notify) and holds it until the
--    commit record is flushed: enqueuing commits ran one at a time, and more
--    writers made it worse. The trigger goes; the enqueue functions now
--    notify at most once per quarter second, whoever enqueues (below), and
--    outboxd, once woken, looks again every few milliseconds while events
--    keep arriving (src/claim.rs), so the events in between are not late.
-- 2. The CHECK constraints of outbox.events. PostgreSQL reads each one back
--    from its stored text and plans it again for every INSERT statement:
--    the six cost about 135,000 CPU instructions per enqueue, a third of
--    the enqueue's whole cost over a bare insert (callgrind, one backend).
--    The rows they guarded are written only by the enqueue functions (which
--    check their arguments and write nothing else) and by outboxd's own
--    statements (which keep every invariant and are tested to), and no
--    longer by the application's role (3.). So they are dropped; outboxd's
--    statements stay safe with any value in these columns (a hand-written
--    `attempts` near the integer limit is failed unsent by the claim, not
--    overflowed).
-- 3. Three plpgsql frames, a payload checked twice, and statements run
--    through SPI for checks that plain expressions do. Each entry point is
--    now one frame with one INSERT.
--
-- The functions run with their owner's rights (SECURITY DEFINER) and a
-- fixed search_path, so the application's role needs EXECUTE on them and
-- no INSERT on outbox.events: it can no longer write a row around them.
--
-- Online: dropping the trigger and the constraints changes only the
-- catalogue. They take a brief exclusive lock on outbox.events, first thing
-- in this transaction, which lasts a few milliseconds; `outboxd migrate`
-- waits for it at most a moment at a time (lock_timeout), so a long
-- transaction of the application's holding the table makes the migration
-- try again later instead of queueing every enqueue behind it. Nothing is
-- scanned or rewritten. A daemon older than this migration keeps working:
-- it reads the same columns, listens on the same channel, and is woken by
-- the throttled notification (it then finds events committed meanwhile at
-- its next poll).

DROP TRIGGER IF EXISTS events_notify ON outbox.events;
DROP FUNCTION IF EXISTS outbox.notify_new_events();

ALTER TABLE outbox.events
    DROP CONSTRAINT IF EXISTS events_company_id_positive,
    DROP CONSTRAINT IF EXISTS events_state_known,
    DROP CONSTRAINT IF EXISTS events_attempts_not_negative,
    DROP CONSTRAINT IF EXISTS events_delivered_at_iff_delivered,
    DROP CONSTRAINT IF EXISTS events_attempts_at_replay_in_range,
    DROP CONSTRAINT IF EXISTS events_attempts_bounded;

COMMENT ON TABLE outbox.events IS
    'Outbox: one row per webhook. Written only by outbox.enqueue*() (as their owner) and outboxd.';

-- ---------------------------------------------------------------------------
-- The wake-up
-- ---------------------------------------------------------------------------
--
-- Its value is a moment, in milliseconds since the Unix epoch, before which
-- no enqueue needs to notify: the last notification was sent (or is about
-- to be, at its transaction's commit) less than a quarter second earlier,
-- and outboxd, woken by it, keeps looking for new events for a while
-- (src/claim.rs, HOT_HOLD, which must stay above this quarter second).
--
-- A sequence, not a table row: reading and setting it is neither
-- transactional nor MVCC, so it never waits for another transaction, never
-- makes a REPEATABLE READ or SERIALIZABLE caller fail with a serialization
-- error, and leaves no dead row. Set at most four times a second.
--
-- The first enqueue after a quiet quarter second notifies, at its commit;
-- a transaction-level advisory lock elects one if several arrive at once,
-- so that two notifying transactions never wait for each other. If that
-- transaction rolls back, nothing is sent and the next quarter second's
-- events wait for outboxd's poll (delivery.poll_interval) instead.
CREATE SEQUENCE outbox.wakeup AS bigint MINVALUE 0 START 0;

COMMENT ON SEQUENCE outbox.wakeup IS
    'Until when (ms since the epoch) enqueues need not NOTIFY outbox_events: set by the enqueue that notified.';

-- ---------------------------------------------------------------------------
-- Enqueue functions
-- ---------------------------------------------------------------------------
--
-- Both entry points end alike: one INSERT, then the wake-up above. It is
-- written out in each (eight lines) rather than called, to keep each
-- enqueue one plpgsql frame.
--
-- The advisory lock's key is the pair ('outb' as an integer, 1), in the
-- two-integer space, which no bigint key of the application's can meet.

CREATE OR REPLACE FUNCTION outbox.enqueue(event_type text, company_id bigint, payload jsonb) RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id uuid;
    now_ms bigint;
BEGIN
    IF enqueue.event_type IS NULL OR enqueue.event_type !~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$' THEN
        RAISE EXCEPTION 'outbox.enqueue: event_type must look like "payment.cancellation" (lowercase words joined by dots), got %',
            coalesce(quote_literal(enqueue.event_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue.company_id IS NULL OR enqueue.company_id <= 0 THEN
        RAISE EXCEPTION 'outbox.enqueue: company_id must be a positive integer, got %',
            coalesce(enqueue.company_id::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(enqueue.payload) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'outbox.enqueue: payload must be a JSON object, got %',
            coalesce(jsonb_typeof(enqueue.payload), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue.event_type = 'payment.cancellation' THEN
        -- The one place that says what a payment.cancellation payload is.
        PERFORM outbox.check_payment_cancellation_payload(enqueue.payload);
        IF (enqueue.payload->>'companyId')::bigint IS DISTINCT FROM enqueue.company_id THEN
            RAISE EXCEPTION 'outbox.enqueue: payload companyId % does not match company_id %',
                enqueue.payload->>'companyId', enqueue.company_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    INSERT INTO outbox.events (event_type, company_id, payload)
    VALUES (enqueue.event_type, enqueue.company_id, enqueue.payload)
    RETURNING id INTO new_id;

    IF clock_timestamp() >= 'epoch'::timestamptz
                            + coalesce(pg_sequence_last_value('outbox.wakeup'), 0) * interval '1 millisecond' THEN
        now_ms := floor(extract(epoch FROM clock_timestamp()) * 1000);
        IF pg_try_advisory_xact_lock(1869968482, 1) THEN
            PERFORM setval('outbox.wakeup', now_ms + 250);
            PERFORM pg_notify('outbox_events', '');
        END IF;
    END IF;
    RETURN new_id;
END
$$;

-- The Payment Cancellation webhook: exactly the body of the integrators'
-- documentation (companyId and paymentId as integers, paymentNumber as a
-- string, orderIds as the order ids joined by commas in the given order,
-- absent, not null nor "", without orders). Its arguments are checked here
-- with plain expressions; the body built from them needs no second check.
CREATE OR REPLACE FUNCTION outbox.enqueue_payment_cancellation(
    company_id     bigint,
    payment_id     bigint,
    payment_number text,
    order_ids      bigint[] DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    orders  integer := coalesce(cardinality(order_ids), 0);
    bad     bigint;
    new_id  uuid;
    now_ms  bigint;
BEGIN
    -- Every check in one expression, true for a good call: one evaluation
    -- on the path every enqueue takes. Only when it is not true does the
    -- block below find which argument is wrong and say so.
    IF (enqueue_payment_cancellation.company_id > 0 AND payment_id > 0
        AND btrim(payment_number) <> '' AND char_length(payment_number) <= 255
        AND (orders = 0 OR (array_ndims(order_ids) = 1 AND 0 < ALL (order_ids)))) IS NOT TRUE THEN
        IF enqueue_payment_cancellation.company_id IS NULL OR enqueue_payment_cancellation.company_id <= 0 THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: company_id must be a positive integer, got %',
                coalesce(enqueue_payment_cancellation.company_id::text, 'NULL')
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF payment_id IS NULL OR payment_id <= 0 THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: payment_id must be a positive integer, got %',
                coalesce(payment_id::text, 'NULL')
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF payment_number IS NULL THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: payment_number must be a non-blank string, got NULL'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF btrim(payment_number) = '' THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: payment_number must not be blank'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF char_length(payment_number) > 255 THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: payment_number is longer than 255 characters'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF array_ndims(order_ids) <> 1 THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: order_ids must be a one-dimensional array'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF array_position(order_ids, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: order_ids must not contain NULL (position %)',
                array_position(order_ids, NULL)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT o INTO bad FROM unnest(order_ids) AS o WHERE o <= 0 LIMIT 1;
        RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: order id % is not a positive integer', bad
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Repeated order ids: a payment is applied to a handful of orders, for
    -- which comparing each with those before it is cheaper than a query.
    IF orders > 1 THEN
        IF orders <= 32 THEN
            FOR i IN array_lower(order_ids, 1) + 1 .. array_upper(order_ids, 1) LOOP
                IF array_position(order_ids, order_ids[i]) < i THEN
                    bad := order_ids[i];
                    EXIT;
                END IF;
            END LOOP;
        ELSE
            SELECT o INTO bad FROM unnest(order_ids) AS o GROUP BY o HAVING count(*) > 1 LIMIT 1;
        END IF;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: order id % is repeated in order_ids', bad
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    INSERT INTO outbox.events (event_type, company_id, payload)
    VALUES ('payment.cancellation', enqueue_payment_cancellation.company_id,
            CASE WHEN orders > 0
                 THEN jsonb_build_object(
                          'companyId', enqueue_payment_cancellation.company_id,
                          'paymentId', payment_id,
                          'paymentNumber', payment_number,
                          'orderIds', array_to_string(order_ids, ','))
                 ELSE jsonb_build_object(
                          'companyId', enqueue_payment_cancellation.company_id,
                          'paymentId', payment_id,
                          'paymentNumber', payment_number)
            END)
    RETURNING id INTO new_id;

    IF clock_timestamp() >= 'epoch'::timestamptz
                            + coalesce(pg_sequence_last_value('outbox.wakeup'), 0) * interval '1 millisecond' THEN
        now_ms := floor(extract(epoch FROM clock_timestamp()) * 1000);
        IF pg_try_advisory_xact_lock(1869968482, 1) THEN
            PERFORM setval('outbox.wakeup', now_ms + 250);
            PERFORM pg_notify('outbox_events', '');
        END IF;
    END IF;
    RETURN new_id;
END
$$;

COMMENT ON FUNCTION outbox.enqueue_payment_cancellation(bigint, bigint, text, bigint[]) IS
    'Call inside the transaction that cancels the payment. Returns the event id (store it to read the result back); raises on bad arguments.';
COMMENT ON FUNCTION outbox.enqueue(text, bigint, jsonb) IS
    'Enqueues an event of any type inside the caller''s transaction. Returns the event id; raises on bad arguments.';
