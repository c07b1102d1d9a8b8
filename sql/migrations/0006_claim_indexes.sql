-- 0006: the claims' indexes hold pending rows and leased rows apart.
--
-- Until 0005, events_due held every pending and leased row by
-- next_attempt_at, and 0005's events_endpoint_due held the same rows by
-- endpoint. A claim turns a pending row into a leased one; being an update
-- of indexed columns, it writes a new entry into every index whose
-- condition the new version meets, so with both indexes each claimed row
-- cost two entries where it had cost one (the drain benchmark: 81-84% of
-- the rate before 0005, docs/BENCHMARKS.md). Now:
--
--   events_pending_due       pending rows by next_attempt_at: the plain
--                            claim's oldest-first walk (sql/queries/claim.sql)
--   events_endpoint_pending  pending rows by endpoint, each endpoint's oldest
--                            first: the fair claim (claim_fair.sql)
--   events_lease_expiry      leased rows by the end of their lease: the
--                            leases that ran out (release_expired.sql)
--
-- A claimed row gets one entry (events_lease_expiry), as before 0005. A
-- lease that runs out (its daemon died) is no longer claimed where it
-- lies: outboxd puts the row back to pending (release_expired.sql) and the
-- claims take it from there like any other due row.
--
-- The indexes are built, and the two they replace dropped, by
-- 0006_claim_indexes.online.sql after this transaction, without blocking
-- the sales application's writes. A daemon older than this migration keeps
-- working on the new indexes, but its claims then read the whole queue:
-- restart it on the new binary soon after migrating (`systemctl restart
-- outboxd` does both: systemd/outboxd-migrate.service runs before it).
--
-- The circuit breaker's function counts an endpoint's waiting events for
-- its emails; it now reads them from events_endpoint_pending (only the
-- counting query differs from 0005's).

CREATE OR REPLACE FUNCTION outbox.circuit_record(
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
        -- The events held back (pending; those in flight are not counted),
        -- read from events_endpoint_pending, up to 100,000: the email says
        -- "over 100,000" beyond.
        SELECT count(*) INTO waiting FROM (
            SELECT 1 FROM outbox.events AS e
             WHERE e.company_id = p_company_id AND e.event_type = p_event_type
               AND e.state = 'pending'
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
