-- 0010: signing secrets the daemon can use, kept with their endpoint's key,
-- and an endpoint that stopped signing noticed (issue 25, point 7).
--
-- 1. The check is the daemon's. 0008 decoded the base64 with PostgreSQL's
--    decode(), which ignores the unused low bits of the last character:
--    'whsec_' || repeat('A', 42) || 'B=' was stored, and the daemon, whose
--    decoder (Rust's base64, the standard engine) refuses such bits,
--    failed every event of that endpoint as permanent. A secret is now
--    valid when its base64 is canonical (padded, unused bits zero: the
--    decoded bytes encode back to the same text) and decodes to 24 to 64
--    bytes, which is exactly what src/http/sign.rs accepts. (The daemon
--    also trims surrounding whitespace, for secret files; the schema
--    refuses it, so no stored secret has any.)
--
--    Rows stored under 0008 that are not canonical are rewritten in their
--    canonical spelling. It is the same key: the bytes that decode() took
--    from them, which are also what the Standard Webhooks libraries
--    (Python's b64decode, Node's Buffer, Go's StdEncoding) take from the
--    text the receiver holds, so its signatures verify there. Their events
--    failed until now ("invalid signing secret") and can be replayed. A
--    row that breaks even 0008's rule (written while the check was
--    dropped) is left as it is and the constraint stays NOT VALID, so that
--    the migration does not fail on it; its endpoint's events keep failing
--    with the reason, as before.
--
-- 2. Secrets are no longer deleted with their endpoint. They belong to the
--    key (company_id, event_type): a settings screen that saves by
--    deleting the endpoint row and inserting it again kept signing
--    nothing afterwards, without a word. `outboxd endpoint remove` deletes
--    them itself; retention deletes expired ones (retention.sql).
--
-- 3. outbox.signed_endpoints remembers the keys that have had a secret
--    (filled by a trigger on the secrets table, kept when the secrets go),
--    so that outboxd can tell an endpoint that stopped signing (its
--    secrets all expired or were deleted) from one that never signed:
--    it logs it, counts it, and emails the endpoint's addresses once
--    (sql/queries/signing_watch.sql), under the new email kind
--    'signing_stopped'.
--
-- Locks: brief, on outboxd's own tables (the secrets, endpoints and
-- emails tables), which the application's enqueue does not touch. The
-- secrets table is small (a few rows per signing endpoint): validating
-- its constraint reads it whole.

-- 1. The daemon's rule.
ALTER TABLE outbox.endpoint_signing_secrets
    DROP CONSTRAINT IF EXISTS endpoint_signing_secrets_format;

-- "whsec_" and the canonical base64 of 24 to 64 bytes.
CREATE OR REPLACE FUNCTION outbox.is_valid_signing_secret(secret text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE
        WHEN secret IS NULL OR secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$'
             OR (length(secret) - 6) % 4 <> 0 THEN false
        ELSE octet_length(decode(substr(secret, 7), 'base64')) BETWEEN 24 AND 64
             -- encode() breaks lines every 76 characters.
             AND translate(encode(decode(substr(secret, 7), 'base64'), 'base64'), E'\n', '')
                 = substr(secret, 7)
    END
$$;

CREATE OR REPLACE FUNCTION outbox.endpoint_signing_secrets_validate() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT outbox.is_valid_signing_secret(NEW.secret) THEN
        RAISE EXCEPTION 'outbox.endpoint_signing_secrets: secret must be "whsec_" followed by the standard base64 (padded with "=", unused bits zero) of 24 to 64 random bytes'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'endpoint_signing_secrets_format';
    END IF;
    RETURN NEW;
END
$$;

-- The same key, spelt canonically: only rows that met 0008's rule.
UPDATE outbox.endpoint_signing_secrets
   SET secret = 'whsec_' || translate(encode(decode(substr(secret, 7), 'base64'), 'base64'), E'\n', '')
 WHERE secret ~ '^whsec_[A-Za-z0-9+/]+={0,2}$'
   AND (length(secret) - 6) % 4 = 0
   AND octet_length(decode(substr(secret, 7), 'base64')) BETWEEN 24 AND 64
   AND NOT outbox.is_valid_signing_secret(secret);

ALTER TABLE outbox.endpoint_signing_secrets
    ADD CONSTRAINT endpoint_signing_secrets_format CHECK (outbox.is_valid_signing_secret(secret)) NOT VALID;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbox.endpoint_signing_secrets
                    WHERE NOT outbox.is_valid_signing_secret(secret)) THEN
        ALTER TABLE outbox.endpoint_signing_secrets VALIDATE CONSTRAINT endpoint_signing_secrets_format;
    ELSE
        RAISE WARNING 'outbox.endpoint_signing_secrets holds secrets the daemon cannot use (written around the check); their endpoints'' events fail until they are replaced';
    END IF;
END
$$;

-- 2. Kept when the endpoint row goes.
ALTER TABLE outbox.endpoint_signing_secrets
    DROP CONSTRAINT IF EXISTS endpoint_signing_secrets_endpoint_fk;

-- 3. The keys that sign, or did.
CREATE TABLE outbox.signed_endpoints (
    company_id     bigint      NOT NULL,
    event_type     text        NOT NULL,
    -- When its first secret was stored.
    since          timestamptz NOT NULL DEFAULT now(),
    -- Written by outboxd: since when it has had no active secret (its
    -- last one expired then, or it was found without any), and it was
    -- reported; NULL while it signs.
    unsigned_since timestamptz,
    PRIMARY KEY (company_id, event_type)
);

INSERT INTO outbox.signed_endpoints (company_id, event_type, since)
SELECT company_id, event_type, min(created_at)
  FROM outbox.endpoint_signing_secrets
 GROUP BY company_id, event_type;

-- With its owner's rights (and a fixed search_path): a settings screen
-- allowed to write the secrets needs no grant on this table.
CREATE FUNCTION outbox.endpoint_signing_secrets_mark_signed() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO outbox.signed_endpoints (company_id, event_type)
    VALUES (NEW.company_id, NEW.event_type)
    ON CONFLICT (company_id, event_type) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER endpoint_signing_secrets_mark_signed
    AFTER INSERT OR UPDATE OF company_id, event_type ON outbox.endpoint_signing_secrets
    FOR EACH ROW EXECUTE FUNCTION outbox.endpoint_signing_secrets_mark_signed();

COMMENT ON TABLE outbox.signed_endpoints IS
    'Endpoints (company_id, event_type) that have had a signing secret; outboxd reports one left without an active secret. Delete the row (with the secrets) to stop signing on purpose.';
COMMENT ON TABLE outbox.endpoint_signing_secrets IS
    'Standard Webhooks signing secrets per endpoint key; requests are signed with every one not expired. Not deleted with the endpoint row.';

-- signing_stopped: an endpoint that signed has no active secret; `about`
-- says since when and why (as it was then).
ALTER TABLE outbox.emails
    DROP CONSTRAINT emails_kind_known,
    ADD CONSTRAINT emails_kind_known
        CHECK (kind IN ('failures', 'circuit_opened', 'circuit_closed', 'signing_stopped')) NOT VALID;
