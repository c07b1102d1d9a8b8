-- 0011: the company pauses and resumes its own endpoint, from the sales
-- application's settings screen, without losing events.
--
-- Switching an endpoint off (enabled = false) fails its events at once, by
-- design: the company does not want them. A pause is for "our ERP is down
-- for maintenance tonight": the endpoint's events are held, not attempted,
-- not failed, their retries not used up, exactly as while an operator's
-- `outboxd endpoint pause` holds it (the circuit opened by hand, no
-- probe), and `circuit.max_hold` still fails them in the end, with the
-- reason and an email, so a pause forgotten for good does not keep events
-- for ever. Resuming lets them flow at once.
--
-- Both run as the schema's owner (SECURITY DEFINER, with a fixed
-- search_path), so the application's role needs only EXECUTE on them, not
-- rights on outbox.endpoint_circuits. A company's resume undoes its own
-- pause only: an operator's pause, or a circuit the endpoint's failures
-- opened, stays.

CREATE FUNCTION outbox.pause_endpoint(
    p_company_id bigint, p_event_type text DEFAULT 'payment.cancellation')
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbox.endpoints AS ep
                    WHERE ep.company_id = p_company_id AND ep.event_type = p_event_type) THEN
        RAISE EXCEPTION 'outbox.pause_endpoint: company % has no endpoint for %',
                        p_company_id, p_event_type
            USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO outbox.endpoint_circuits AS c
           (company_id, event_type, state, opened_at, retry_at, manual, last_error, changed_at)
    VALUES (p_company_id, p_event_type, 'open', now(), 'infinity', true, 'paused by the company', now())
    ON CONFLICT (company_id, event_type) DO UPDATE
       SET state = 'open', opened_at = coalesce(c.opened_at, now()), retry_at = 'infinity',
           manual = true,
           -- An operator's pause keeps its word.
           last_error = CASE WHEN c.manual THEN c.last_error ELSE 'paused by the company' END,
           changed_at = now();
END
$$;

CREATE FUNCTION outbox.resume_endpoint(
    p_company_id bigint, p_event_type text DEFAULT 'payment.cancellation')
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH resumed AS (
        UPDATE outbox.endpoint_circuits AS c
           SET state = 'closed', failures = 0, opened_at = NULL, retry_at = NULL, cooldown_ms = 0,
               manual = false, last_error = NULL, changed_at = now()
         WHERE c.company_id = p_company_id AND c.event_type = p_event_type
           AND c.manual AND c.last_error = 'paused by the company'
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM resumed)
$$;

REVOKE ALL ON FUNCTION outbox.pause_endpoint(bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.resume_endpoint(bigint, text) FROM PUBLIC;

COMMENT ON FUNCTION outbox.pause_endpoint(bigint, text) IS
    'The company pauses its endpoint: its events are held (not failed) until outbox.resume_endpoint, or circuit.max_hold.';
COMMENT ON FUNCTION outbox.resume_endpoint(bigint, text) IS
    'Undoes the company''s own pause (true if it did); an operator''s pause or a circuit opened by failures stays.';
