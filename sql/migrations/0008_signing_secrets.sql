-- 0008: signing secrets (Standard Webhooks, src/sign.rs).
--
-- An endpoint signs its requests while it has an active secret here: every
-- request then carries webhook-timestamp and webhook-signature, one
-- signature per active secret (newest first), so that during a rotation a
-- receiver holding either the old or the new secret accepts it. A secret is
-- active until its expires_at (NULL: no end). Signing is independent of the
-- endpoint's auth_type.
--
-- A new table, empty at creation: nothing is scanned, and the foreign key's
-- brief lock is on outboxd's endpoints table, which enqueues do not touch.

-- "whsec_" and the base64 of 24 to 64 bytes, as the specification has it.
CREATE FUNCTION outbox.is_valid_signing_secret(secret text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE
        WHEN secret IS NULL OR secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$'
             OR (length(secret) - 6) % 4 <> 0 THEN false
        ELSE octet_length(decode(substr(secret, 7), 'base64')) BETWEEN 24 AND 64
    END
$$;

CREATE TABLE outbox.endpoint_signing_secrets (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company_id  bigint      NOT NULL,
    event_type  text        NOT NULL,
    secret      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- When it stops being used (an old secret kept through a rotation);
    -- NULL: until removed.
    expires_at  timestamptz,
    CONSTRAINT endpoint_signing_secrets_endpoint_fk FOREIGN KEY (company_id, event_type)
        REFERENCES outbox.endpoints (company_id, event_type) ON DELETE CASCADE ON UPDATE CASCADE,
    CONSTRAINT endpoint_signing_secrets_format CHECK (outbox.is_valid_signing_secret(secret))
);

-- The claims look up an endpoint's secrets by its key.
CREATE INDEX endpoint_signing_secrets_endpoint
    ON outbox.endpoint_signing_secrets (company_id, event_type);

-- A clear error that does not echo the row: a CHECK violation's DETAIL
-- would print the secret into the application's error log.
CREATE FUNCTION outbox.endpoint_signing_secrets_validate() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT outbox.is_valid_signing_secret(NEW.secret) THEN
        RAISE EXCEPTION 'outbox.endpoint_signing_secrets: secret must be "whsec_" followed by the base64 of 24 to 64 random bytes'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoint_signing_secrets_format';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER endpoint_signing_secrets_validate
    BEFORE INSERT OR UPDATE ON outbox.endpoint_signing_secrets
    FOR EACH ROW EXECUTE FUNCTION outbox.endpoint_signing_secrets_validate();

COMMENT ON TABLE outbox.endpoint_signing_secrets IS
    'Standard Webhooks signing secrets per endpoint; requests are signed with every one not expired.';
