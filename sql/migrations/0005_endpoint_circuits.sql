-- 0005: one tenant cannot hold up the others.
--
-- Three things, all written by outboxd only; the sales application's
-- enqueue touches none of them (no shared per-company or per-endpoint row is
-- updated when an event is written, so two cancellations of one company
-- never wait on each other's lock):
--
-- 1. outbox.endpoints.max_in_flight: an endpoint's own cap on requests in
--    flight, over the daemon's default (`delivery.endpoint_concurrency`).
-- 2. outbox.endpoint_circuits: the circuit breaker of each endpoint that has
--    failed, shared by every instance. No row means closed and healthy.
-- 3. The index the fair claim walks (sql/queries/claim_fair.sql), built
--    by 0005_endpoint_circuits.online.sql, outside this transaction, with
--    CREATE INDEX CONCURRENTLY: a plain CREATE INDEX on a large outbox
--    would block every enqueue until it finished.

ALTER TABLE outbox.endpoints
    ADD COLUMN max_in_flight integer,
    -- NOT VALID: existing rows are all NULL, and validating would scan the
    -- table under a lock; new and updated rows are checked from now on.
    ADD CONSTRAINT endpoints_max_in_flight_range
        CHECK (max_in_flight IS NULL OR max_in_flight BETWEEN 1 AND 1000) NOT VALID;

COMMENT ON COLUMN outbox.endpoints.max_in_flight IS
    'Requests in flight to this endpoint at most, per outboxd instance (NULL: delivery.endpoint_concurrency).';

-- The settings screen gets a readable error for a bad cap, as for the other
-- columns (the trigger function is replaced, its checks kept).
CREATE OR REPLACE FUNCTION outbox.endpoints_validate_cap() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.max_in_flight IS NOT NULL AND NEW.max_in_flight NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'outbox.endpoints: max_in_flight must be between 1 and 1000, or NULL for the daemon''s default, got %', NEW.max_in_flight
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoints_max_in_flight_range';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER endpoints_validate_cap
    BEFORE INSERT OR UPDATE ON outbox.endpoints
    FOR EACH ROW EXECUTE FUNCTION outbox.endpoints_validate_cap();

-- ---------------------------------------------------------------------------
-- Circuit breakers: one row per endpoint (company and event type) that has
-- failed since it last recovered, or that an operator paused.
-- ---------------------------------------------------------------------------
--
-- state      what the claim does                  retry_at means
-- closed     delivers, up to the endpoint's cap    (unused)
-- open       holds its events: none attempted,     when one probe may go
--            none failed, no attempt counted       ('infinity' when paused by hand)
-- half_open  one probe event is out                when that probe's lease ends
--
-- The record statement moves the state (outbox.circuit_record below): enough
-- retryable failures in a row open it; any answer from the receiver closes
-- it; a failed probe opens it again with twice the cool-down, up to a bound.
-- The claim takes the probe under this row's lock, so every instance sees
-- the same state and only one probe goes out at a time.
-- paused_until is set from a 429 or 503 answer's Retry-After: the whole
-- endpoint waits that long, whatever the state.
CREATE TABLE outbox.endpoint_circuits (
    company_id   bigint      NOT NULL,
    event_type   text        NOT NULL,
    state        text        NOT NULL DEFAULT 'closed',
    -- Retryable failures since the receiver last answered.
    failures     integer     NOT NULL DEFAULT 0,
    opened_at    timestamptz,
    retry_at     timestamptz,
    cooldown_ms  bigint      NOT NULL DEFAULT 0,
    paused_until timestamptz,
    -- Opened by an operator (`outboxd endpoint pause`): no probe until reset.
    manual       boolean     NOT NULL DEFAULT false,
    last_error   text,
    -- The moment of the last change of state, and the change (for emails
    -- and the CLI): opened, reopened, closed, paused.
    changed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, event_type),
    CONSTRAINT endpoint_circuits_state_known CHECK (state IN ('closed', 'open', 'half_open')),
    CONSTRAINT endpoint_circuits_failures_not_negative CHECK (failures >= 0),
    CONSTRAINT endpoint_circuits_cooldown_not_negative CHECK (cooldown_ms >= 0),
    CONSTRAINT endpoint_circuits_open_has_retry_at CHECK (state = 'closed' OR retry_at IS NOT NULL)
);

COMMENT ON TABLE outbox.endpoint_circuits IS
    'Circuit breaker per endpoint, written by outboxd only. No row: closed. Read it to show an endpoint as down.';

-- ---------------------------------------------------------------------------
-- Circuit emails: the endpoint's notify_emails are told once when its
-- circuit opens and once when it closes again, not once per held event.
-- ---------------------------------------------------------------------------

-- failures: the digest of events that failed for good (notifications);
-- circuit_opened / circuit_closed: about the endpoint, described in `about`
-- as it was at that moment (no notifications).
ALTER TABLE outbox.emails
    ADD COLUMN kind text NOT NULL DEFAULT 'failures',
    ADD COLUMN about jsonb,
    ADD CONSTRAINT emails_kind_known
        CHECK (kind IN ('failures', 'circuit_opened', 'circuit_closed')) NOT VALID;

-- Queues the email about a circuit that opened or closed, throttled: an
-- "opened" email at most once per notification window per endpoint, and a
-- "closed" email only after an "opened" one was queued (people are told it
-- is back only if they were told it was down), so a flapping endpoint
-- sends at most two a window.
CREATE FUNCTION outbox.circuit_email(
    p_company_id bigint, p_event_type text, p_kind text, p_about jsonb, p_window_ms bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    last_kind text;
BEGIN
    SELECT e.kind INTO last_kind FROM outbox.emails AS e
     WHERE e.company_id = p_company_id AND e.event_type = p_event_type
       AND e.kind IN ('circuit_opened', 'circuit_closed')
     ORDER BY e.created_at DESC, e.id DESC
     LIMIT 1;
    IF p_kind = 'circuit_closed' AND last_kind IS DISTINCT FROM 'circuit_opened' THEN
        RETURN;
    END IF;
    IF p_kind = 'circuit_opened' AND EXISTS (
           SELECT 1 FROM outbox.emails AS e
            WHERE e.company_id = p_company_id AND e.event_type = p_event_type
              AND e.kind = 'circuit_opened'
              AND e.created_at > now() - p_window_ms * interval '1 millisecond') THEN
        RETURN;
    END IF;
    INSERT INTO outbox.emails (company_id, event_type, recipients, kind, about)
    SELECT ep.company_id, ep.event_type, ep.notify_emails, p_kind,
           p_about || jsonb_build_object('url', ep.url)
      FROM outbox.endpoints AS ep
     WHERE ep.company_id = p_company_id AND ep.event_type = p_event_type
       AND cardinality(ep.notify_emails) > 0;
END
$$;

-- What one record statement learnt about one endpoint, applied to its
-- circuit under the row's lock. Returns the change it made, if any:
-- 'opened', 'reopened' (a probe failed), 'closed', or NULL. record.sql calls
-- it only for endpoints that failed, were told to pause, or have a circuit
-- that is not closed and clean: a healthy endpoint's deliveries write nothing
-- here.
--
--   p_failed    retryable failures in this group (timeouts, connection
--             errors, 408, 425, 429, 5xx)
--   p_answered  the receiver answered at least once with something that is
--             not worth retrying (success, status 0, a 4xx): it is reachable
--   p_pause_ms  the longest Retry-After of a 429 or 503 in the group (NULL: none)
--   p_error     the last failure, kept to show why the circuit opened
--   p_open_after, p_cooldown_ms, p_max_cooldown_ms: the daemon's [circuit] settings
--   p_window_ms the daemon's notify.window, which throttles the emails
CREATE FUNCTION outbox.circuit_record(
    p_company_id bigint, p_event_type text, p_failed integer, p_answered boolean,
    p_pause_ms bigint, p_error text, p_open_after integer, p_cooldown_ms bigint,
    p_max_cooldown_ms bigint, p_window_ms bigint)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    c outbox.endpoint_circuits;
    change text;
    was_opened_at timestamptz;
    waiting bigint;
    -- Times in the email's snapshot: RFC 3339 in UTC, whatever the
    -- session's TimeZone.
    utc constant text := 'YYYY-MM-DD"T"HH24:MI:SS"Z"';
BEGIN
    INSERT INTO outbox.endpoint_circuits (company_id, event_type)
    VALUES (p_company_id, p_event_type)
    ON CONFLICT (company_id, event_type) DO NOTHING;
    SELECT * INTO c FROM outbox.endpoint_circuits AS ci
     WHERE ci.company_id = p_company_id AND ci.event_type = p_event_type
       FOR UPDATE;

    IF p_pause_ms IS NOT NULL THEN
        c.paused_until := greatest(c.paused_until, now() + p_pause_ms * interval '1 millisecond');
    END IF;
    IF p_answered THEN
        c.failures := p_failed;
    ELSE
        c.failures := least(c.failures::bigint + p_failed, 1000000000)::integer;
    END IF;
    c.last_error := coalesce(left(p_error, 500), c.last_error);

    IF c.manual THEN
        NULL; -- an operator holds it: only counts change
    ELSIF c.state = 'half_open' AND p_failed > 0 AND NOT p_answered THEN
        -- The probe failed: open again, for twice as long (bounded).
        c.cooldown_ms := least(greatest(c.cooldown_ms, p_cooldown_ms) * 2, p_max_cooldown_ms);
        c.state := 'open';
        c.retry_at := now() + c.cooldown_ms * interval '1 millisecond';
        change := 'reopened';
    ELSIF c.state <> 'closed' AND p_answered THEN
        was_opened_at := c.opened_at;
        c.state := 'closed';
        c.opened_at := NULL;
        c.retry_at := NULL;
        c.cooldown_ms := 0;
        change := 'closed';
    ELSIF c.state = 'closed' AND c.failures >= p_open_after THEN
        c.state := 'open';
        c.opened_at := now();
        c.cooldown_ms := p_cooldown_ms;
        c.retry_at := now() + p_cooldown_ms * interval '1 millisecond';
        change := 'opened';
    END IF;
    IF change IS NOT NULL THEN
        c.changed_at := now();
    END IF;

    UPDATE outbox.endpoint_circuits AS ci
       SET state = c.state, failures = c.failures, opened_at = c.opened_at, retry_at = c.retry_at,
           cooldown_ms = c.cooldown_ms, paused_until = c.paused_until, last_error = c.last_error,
           changed_at = c.changed_at
     WHERE ci.company_id = p_company_id AND ci.event_type = p_event_type;

    IF change IN ('opened', 'closed') THEN
        -- Counted up to 100,000: the email says "over 100,000" beyond.
        SELECT count(*) INTO waiting FROM (
            SELECT 1 FROM outbox.events AS e
             WHERE e.company_id = p_company_id AND e.event_type = p_event_type
               AND e.state IN ('pending', 'leased')
             LIMIT 100001) AS w;
        PERFORM outbox.circuit_email(
            p_company_id, p_event_type,
            CASE change WHEN 'opened' THEN 'circuit_opened' ELSE 'circuit_closed' END,
            jsonb_build_object(
                'opened_at', to_char(coalesce(was_opened_at, c.opened_at) AT TIME ZONE 'UTC', utc),
                'closed_at', CASE WHEN change = 'closed' THEN to_char(now() AT TIME ZONE 'UTC', utc) END,
                'retry_at', to_char(c.retry_at AT TIME ZONE 'UTC', utc),
                'failures', c.failures,
                'last_error', c.last_error,
                'waiting', waiting),
            p_window_ms);
    END IF;
    RETURN change;
END
$$;
