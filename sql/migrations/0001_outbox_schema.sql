-- 0001: the outbox schema, the contract between the sales application and outboxd.
--
-- Applied by `outboxd migrate` inside one transaction that holds an advisory
-- lock, so several instances starting at once apply it exactly once.
-- Everything is schema-qualified; nothing depends on search_path.

CREATE SCHEMA IF NOT EXISTS outbox;

-- ---------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------

-- A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, then random bits.
-- Event ids are the idempotency key receivers deduplicate on, so they must be
-- unique across databases and restores (a bigint sequence restarts after a
-- rebuild and would make a receiver drop a new event as a "duplicate"). Being
-- time-ordered, they keep the primary key index append-mostly, unlike v4.
CREATE FUNCTION outbox.uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
    SELECT encode(
        set_bit(
            set_bit(
                overlay(uuid_send(gen_random_uuid())
                        PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                        FROM 1 FOR 6),
                52, 1),
            53, 1),
        'hex')::uuid
$$;

-- Practical address check: one @, no whitespace, a dot in the domain, no
-- empty labels. Full RFC 5322 is neither needed nor wanted here: the goal is
-- to catch typos on the settings screen, not to accept every legal oddity.
CREATE FUNCTION outbox.is_valid_email(address text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT char_length(address) <= 254
       AND address ~ '^[A-Za-z0-9.!#$%&''*+/=?^_`{|}~-]+@[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$'
       AND address !~ '(^\.|\.\.|\.@)'
$$;

-- Every element present and a valid address (an empty array is valid).
CREATE FUNCTION outbox.are_valid_emails(addresses text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT coalesce(array_ndims(addresses), 1) = 1
       AND NOT EXISTS (SELECT 1 FROM unnest(addresses) AS a
                        WHERE a IS NULL OR NOT outbox.is_valid_email(a))
$$;

-- http(s) only, a host (name, IPv4 or bracketed IPv6), an optional port and
-- path. Credentials inside the URL are refused: secrets belong in the auth
-- columns, and the URL is shown in logs and notification emails.
CREATE FUNCTION outbox.is_valid_webhook_url(url text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT char_length(url) <= 2048
       AND url ~* '^https?://([a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])(:[0-9]{1,5})?([/?#][^[:space:]]*)?$'
$$;

-- ---------------------------------------------------------------------------
-- Endpoint settings: one row per company and event type ("Step two").
-- ---------------------------------------------------------------------------

CREATE TABLE outbox.endpoints (
    company_id    bigint      NOT NULL,
    event_type    text        NOT NULL DEFAULT 'payment.cancellation',
    url           text        NOT NULL,
    auth_type     text        NOT NULL DEFAULT 'none',
    username      text,
    password      text,
    token         text,
    notify_emails text[]      NOT NULL DEFAULT '{}',
    enabled       boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, event_type),

    -- The trigger below raises friendlier errors first (and without echoing
    -- the row, which holds secrets); these constraints are the backstop that
    -- a DBA sees in \d and that holds even with triggers disabled.
    CONSTRAINT endpoints_company_id_positive CHECK (company_id > 0),
    CONSTRAINT endpoints_event_type_valid CHECK (event_type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$'),
    CONSTRAINT endpoints_url_http_or_https CHECK (outbox.is_valid_webhook_url(url)),
    CONSTRAINT endpoints_auth_type_known CHECK (auth_type IN ('none', 'basic', 'bearer')),
    CONSTRAINT endpoints_basic_needs_username_and_password CHECK (
        auth_type <> 'basic' OR (coalesce(username, '') <> '' AND coalesce(password, '') <> '')),
    CONSTRAINT endpoints_bearer_needs_token CHECK (
        auth_type <> 'bearer' OR coalesce(token, '') <> ''),
    CONSTRAINT endpoints_at_most_5_notify_emails CHECK (cardinality(notify_emails) <= 5),
    CONSTRAINT endpoints_notify_emails_valid CHECK (outbox.are_valid_emails(notify_emails))
);

COMMENT ON TABLE outbox.endpoints IS
    'Webhook endpoint per company and event type, written by the sales application settings screen or `outboxd endpoint set`.';
COMMENT ON COLUMN outbox.endpoints.notify_emails IS
    'Up to 5 addresses that get an email when an event fails for good.';

-- Validates a row before it is written and raises an error that names the
-- problem. A plain CHECK violation would also fail the transaction, but its
-- DETAIL prints the whole failing row, password and token included, into the
-- application's error log.
CREATE FUNCTION outbox.endpoints_validate() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    bad text;
BEGIN
    IF NEW.company_id IS NULL OR NEW.company_id <= 0 THEN
        RAISE EXCEPTION 'outbox.endpoints: company_id must be a positive integer'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_company_id_positive';
    END IF;
    IF NEW.event_type IS NULL OR NEW.event_type !~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$' THEN
        RAISE EXCEPTION 'outbox.endpoints: event_type must look like "payment.cancellation" (lowercase words joined by dots)'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_event_type_valid';
    END IF;
    IF NEW.url IS NULL OR NOT outbox.is_valid_webhook_url(NEW.url) THEN
        RAISE EXCEPTION 'outbox.endpoints: url must be an http:// or https:// URL with a host and no credentials in it'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_url_http_or_https',
                  HINT = 'put the username, password or token in their own columns';
    END IF;
    IF NEW.auth_type IS NULL OR NEW.auth_type NOT IN ('none', 'basic', 'bearer') THEN
        RAISE EXCEPTION 'outbox.endpoints: auth_type must be one of none, basic, bearer'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_auth_type_known';
    END IF;
    IF NEW.auth_type = 'basic' AND (coalesce(NEW.username, '') = '' OR coalesce(NEW.password, '') = '') THEN
        RAISE EXCEPTION 'outbox.endpoints: auth_type basic needs both a username and a password'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_basic_needs_username_and_password';
    END IF;
    IF NEW.auth_type = 'bearer' AND coalesce(NEW.token, '') = '' THEN
        RAISE EXCEPTION 'outbox.endpoints: auth_type bearer needs a token'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_bearer_needs_token';
    END IF;
    IF NEW.notify_emails IS NULL THEN
        NEW.notify_emails := '{}';
    END IF;
    IF NEW.enabled IS NULL THEN
        RAISE EXCEPTION 'outbox.endpoints: enabled must be true or false, not NULL'
            USING ERRCODE = 'not_null_violation', COLUMN = 'enabled';
    END IF;
    IF cardinality(NEW.notify_emails) > 5 THEN
        RAISE EXCEPTION 'outbox.endpoints: at most 5 notify_emails are allowed, got %', cardinality(NEW.notify_emails)
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_at_most_5_notify_emails';
    END IF;
    IF array_position(NEW.notify_emails, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'outbox.endpoints: notify_emails must not contain NULL'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_notify_emails_valid';
    END IF;
    SELECT e INTO bad FROM unnest(NEW.notify_emails) AS e WHERE NOT outbox.is_valid_email(e) LIMIT 1;
    IF FOUND THEN
        -- An email address is not a secret, and naming it is what makes the
        -- message useful on a settings screen.
        RAISE EXCEPTION 'outbox.endpoints: notify_emails contains a malformed address: "%"', bad
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_notify_emails_valid';
    END IF;
    -- Timestamps are the database's to keep; a NULL here would otherwise
    -- fail as a NOT NULL violation that prints the row, secrets included.
    IF TG_OP = 'UPDATE' THEN
        NEW.created_at := OLD.created_at;
    ELSE
        NEW.created_at := coalesce(NEW.created_at, now());
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER endpoints_validate
    BEFORE INSERT OR UPDATE ON outbox.endpoints
    FOR EACH ROW EXECUTE FUNCTION outbox.endpoints_validate();

-- ---------------------------------------------------------------------------
-- Events: one row per webhook to deliver.
-- ---------------------------------------------------------------------------
--
-- state      meaning                                   next_attempt_at means
-- pending    waiting for its first or next attempt     when it is due
-- leased     a daemon is delivering it right now        when the lease expires
-- delivered  the external system answered success      (unused)
-- failed     final: rejected, permanent error, retries  (unused)
--            exhausted, or no usable endpoint
--
-- A leased row whose lease has expired (its daemon died) is due again, so one
-- column and one small index serve both "due for retry" and "lease expired".
-- `attempts` counts claims; together with state = 'leased' it fences every
-- update a daemon makes after delivering, so a daemon whose lease was taken
-- over can never overwrite the newer outcome.

CREATE TABLE outbox.events (
    id               uuid        NOT NULL DEFAULT outbox.uuid_v7(),
    event_type       text        NOT NULL DEFAULT 'payment.cancellation',
    company_id       bigint      NOT NULL,
    payload          jsonb       NOT NULL,
    state            text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    response_message text,
    last_error       text,
    PRIMARY KEY (id),
    CONSTRAINT events_company_id_positive CHECK (company_id > 0),
    CONSTRAINT events_state_known CHECK (state IN ('pending', 'leased', 'delivered', 'failed')),
    CONSTRAINT events_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT events_delivered_at_iff_delivered CHECK ((state = 'delivered') = (delivered_at IS NOT NULL))
);

COMMENT ON TABLE outbox.events IS
    'Outbox: one row per webhook. Written by outbox.enqueue*(), updated only by outboxd.';
COMMENT ON COLUMN outbox.events.id IS
    'Stable event id, sent as the Idempotency-Key and webhook-id headers on every attempt.';
COMMENT ON COLUMN outbox.events.response_message IS
    'What the external system answered (its "message", or "error"), for the sales application to show.';

-- The claim query's index. Partial, so it holds only rows still in flight and
-- stays small however many delivered rows accumulate.
CREATE INDEX events_due ON outbox.events (next_attempt_at)
    WHERE state IN ('pending', 'leased');

-- The sales application looks events up by company (and support by payment).
CREATE INDEX events_company_created ON outbox.events (company_id, created_at);

-- One wake-up per inserting statement, not per row; PostgreSQL also folds
-- identical notifications within a transaction, so a transaction that enqueues
-- many events sends one. NOTIFY is only a hint: outboxd polls as well.
CREATE FUNCTION outbox.notify_new_events() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('outbox_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON outbox.events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_new_events();

-- ---------------------------------------------------------------------------
-- Attempt log: one row per delivery attempt.
-- ---------------------------------------------------------------------------

CREATE TABLE outbox.attempts (
    event_id    uuid        NOT NULL REFERENCES outbox.events (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    started_at  timestamptz NOT NULL,
    duration_ms integer     NOT NULL,
    http_status smallint,
    outcome     text        NOT NULL,
    message     text,
    lease_owner text,
    PRIMARY KEY (event_id, attempt),
    CONSTRAINT attempts_outcome_known CHECK (
        outcome IN ('success', 'rejected', 'retryable', 'permanent', 'no_endpoint'))
);

COMMENT ON TABLE outbox.attempts IS
    'One row per delivery attempt: when, how long, the HTTP status, the outcome and the message or error (truncated).';

-- ---------------------------------------------------------------------------
-- Enqueue functions: what the sales application calls in its transaction.
-- ---------------------------------------------------------------------------

-- Checks a payment.cancellation payload; shared by the generic enqueue so that
-- both entry points accept exactly the same events.
CREATE FUNCTION outbox.check_payment_cancellation_payload(payload jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    extra text;
BEGIN
    IF jsonb_typeof(payload->'companyId') IS DISTINCT FROM 'number'
       OR (payload->>'companyId') !~ '^[1-9][0-9]*$' THEN
        RAISE EXCEPTION 'payment.cancellation payload: companyId must be a positive integer'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(payload->'paymentId') IS DISTINCT FROM 'number'
       OR (payload->>'paymentId') !~ '^[1-9][0-9]*$' THEN
        RAISE EXCEPTION 'payment.cancellation payload: paymentId must be a positive integer'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(payload->'paymentNumber') IS DISTINCT FROM 'string'
       OR btrim(payload->>'paymentNumber') = '' THEN
        RAISE EXCEPTION 'payment.cancellation payload: paymentNumber must be a non-blank string'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF payload ? 'orderIds' AND (jsonb_typeof(payload->'orderIds') IS DISTINCT FROM 'string'
       OR (payload->>'orderIds') !~ '^[1-9][0-9]*(,[1-9][0-9]*)*$') THEN
        RAISE EXCEPTION 'payment.cancellation payload: orderIds must be a string of comma-separated order ids, or absent'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT k INTO extra FROM jsonb_object_keys(payload) AS k
     WHERE k NOT IN ('companyId', 'paymentId', 'paymentNumber', 'orderIds') LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'payment.cancellation payload: unknown key "%"', extra
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Generic entry point for any event type. Raises (failing the caller's
-- transaction) on a bad argument; returns the new event's id.
CREATE FUNCTION outbox.enqueue(event_type text, company_id bigint, payload jsonb) RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    new_id uuid;
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
    RETURN new_id;
END
$$;

-- The Payment Cancellation webhook. Builds exactly the body of the product
-- documentation: companyId and paymentId as integers, paymentNumber as a
-- string, orderIds as a comma-joined string in the given order and absent
-- (not null, not "") when there are no orders.
CREATE FUNCTION outbox.enqueue_payment_cancellation(
    company_id     bigint,
    payment_id     bigint,
    payment_number text,
    order_ids      bigint[] DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    body jsonb;
    dup  bigint;
BEGIN
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
    IF payment_number IS NULL OR btrim(payment_number) = '' THEN
        RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: payment_number must not be blank'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF char_length(payment_number) > 255 THEN
        RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: payment_number is longer than 255 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF order_ids IS NOT NULL AND cardinality(order_ids) > 0 THEN
        IF array_ndims(order_ids) <> 1 THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: order_ids must be a one-dimensional array'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF array_position(order_ids, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: order_ids must not contain NULL (position %)',
                array_position(order_ids, NULL)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT o INTO dup FROM unnest(order_ids) AS o WHERE o <= 0 LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: order id % is not a positive integer', dup
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT o INTO dup FROM unnest(order_ids) AS o GROUP BY o HAVING count(*) > 1 LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'outbox.enqueue_payment_cancellation: order id % is repeated in order_ids', dup
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    body := jsonb_build_object(
        'companyId', enqueue_payment_cancellation.company_id,
        'paymentId', payment_id,
        'paymentNumber', payment_number);
    IF order_ids IS NOT NULL AND cardinality(order_ids) > 0 THEN
        body := body || jsonb_build_object('orderIds', array_to_string(order_ids, ','));
    END IF;

    RETURN outbox.enqueue('payment.cancellation', enqueue_payment_cancellation.company_id, body);
END
$$;

COMMENT ON FUNCTION outbox.enqueue_payment_cancellation(bigint, bigint, text, bigint[]) IS
    'Call inside the transaction that cancels the payment. Returns the event id; raises on bad arguments.';
