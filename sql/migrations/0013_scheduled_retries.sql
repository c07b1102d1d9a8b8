-- 0013: a retry waits in a state of its own, `scheduled`.
--
-- Until now a retry went back to `pending` with next_attempt_at in the
-- future, so the fair claim's skip scan over events_endpoint_pending (one
-- index descent per endpoint with pending rows) walked every endpoint with
-- a retry scheduled, due or not: after a widespread outage, when every
-- tenant has one, each claim cost tens of milliseconds (issue 26: 59 ms
-- at 20,000 such endpoints against 1.8 ms at 100).
--
-- Now outboxd writes a retry as `scheduled` (sql/queries/record.sql), and
-- the claim moves those that have come due back to `pending`, a few
-- hundred at a time, oldest first, through the small index below (the
-- first step of both claims, sql/queries/claim.sql and claim_fair.sql). A
-- `pending` row is so always
-- due (an enqueue, a retry come due, a lease put back, a held endpoint's
-- event), and the claim's cost follows the endpoints that have something
-- due. The enqueue is unchanged: it writes `pending` rows and no entry in
-- the new index.
--
-- For the sales application: `scheduled` means a retry is set for
-- next_attempt_at (README, "The SQL contract"). Code that looked for
-- `pending` events to show "not delivered yet" should now look for
-- `pending` or `scheduled`.
--
-- Online: the index is built with CREATE INDEX CONCURRENTLY (the online
-- part). A daemon older than this migration keeps working beside it: it
-- claims `pending` rows only and writes its retries as before (`pending`,
-- due later), which the new claim still reads correctly; the `scheduled`
-- rows the new daemons write are moved back by the new daemons' claims.
-- Going back to the older version for good needs
--     UPDATE outbox.events SET state = 'pending' WHERE state = 'scheduled';
-- first (README, "Under systemd", on upgrades).

COMMENT ON COLUMN outbox.events.state IS
    'pending: due (first attempt, or a retry come due); scheduled: a retry set for next_attempt_at; '
    'leased: being delivered; delivered; failed (final).';

-- The circuit's email counts the endpoint's waiting events: its retries
-- set for later are among them. The function of 0012, that count changed.
CREATE OR REPLACE FUNCTION outbox.circuit_record(
    p_company_id bigint, p_event_type text, p_failed integer, p_answered boolean,
    p_pause_ms bigint, p_error text, p_open_after integer, p_cooldown_ms bigint,
    p_max_cooldown_ms bigint, p_window_ms bigint, p_probe text)
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
    ELSIF c.state <> 'closed' AND p_probe IS DISTINCT FROM 'failed'
          AND p_probe IS DISTINCT FROM 'answered' THEN
        NULL; -- only its probe moves a circuit that is not closed
    ELSIF c.state = 'half_open' AND p_probe = 'failed' THEN
        -- The probe failed: open again, for twice as long (bounded).
        c.cooldown_ms := least(greatest(c.cooldown_ms, p_cooldown_ms) * 2, p_max_cooldown_ms);
        c.state := 'open';
        c.retry_at := now() + c.cooldown_ms * interval '1 millisecond';
        change := 'reopened';
    ELSIF c.state <> 'closed' AND p_probe = 'answered' THEN
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
        -- The events held back (pending, and since this migration the
        -- retries set for later, `scheduled`; those in flight are not
        -- counted), read from events_endpoint_pending and events_scheduled,
        -- up to 100,000: the email says "over 100,000" beyond.
        SELECT count(*) INTO waiting FROM (
            (SELECT 1 FROM outbox.events AS e
              WHERE e.company_id = p_company_id AND e.event_type = p_event_type
                AND e.state = 'pending')
            UNION ALL
            (SELECT 1 FROM outbox.events AS e
              WHERE e.company_id = p_company_id AND e.event_type = p_event_type
                AND e.state = 'scheduled')
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
