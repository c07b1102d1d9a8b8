-- 0002: error-notification emails.
--
-- When an event fails for good after outboxd tried to deliver it, the
-- statement that marks it failed also writes a notification (record.sql), so
-- a crash or an SMTP outage can never lose one. The mailer gathers an
-- endpoint's notifications into emails, at most one per endpoint per window
-- (a digest when several failed meanwhile), and sends them with a lease, the
-- same way events are delivered.

-- One row per event that failed for good and should be reported.
CREATE TABLE outbox.notifications (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL REFERENCES outbox.events (id) ON DELETE CASCADE,
    company_id   bigint      NOT NULL,
    event_type   text        NOT NULL,
    -- The URL the event was sent to, as it was then (never credentials:
    -- the endpoints table refuses URLs that carry them).
    endpoint_url text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- The email that reports it; NULL while it waits to be gathered.
    email_id     bigint
);

-- What the mailer looks for on every tick: small, since gathered rows leave it.
CREATE INDEX notifications_waiting ON outbox.notifications (company_id, event_type, created_at)
    WHERE email_id IS NULL;
CREATE INDEX notifications_email ON outbox.notifications (email_id) WHERE email_id IS NOT NULL;
CREATE INDEX notifications_event ON outbox.notifications (event_id);

-- One row per email to send. Each recipient gets its own SMTP transaction,
-- so one refused address does not hold back the others; the email is done
-- when every recipient is in sent_to or refused.
--
-- state    meaning                              next_attempt_at means
-- pending  waiting for its first or next try    when it is due
-- sending  a mailer is sending it right now     when the lease expires
-- sent     every recipient accepted or refused  (unused)
CREATE TABLE outbox.emails (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company_id      bigint      NOT NULL,
    event_type      text        NOT NULL,
    recipients      text[]      NOT NULL,
    sent_to         text[]      NOT NULL DEFAULT '{}',
    refused         text[]      NOT NULL DEFAULT '{}',
    state           text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    last_error      text,
    CONSTRAINT emails_state_known CHECK (state IN ('pending', 'sending', 'sent')),
    CONSTRAINT emails_sent_at_iff_sent CHECK ((state = 'sent') = (sent_at IS NOT NULL))
);

ALTER TABLE outbox.notifications
    ADD CONSTRAINT notifications_email_fk FOREIGN KEY (email_id)
        REFERENCES outbox.emails (id) ON DELETE SET NULL;

CREATE INDEX emails_due ON outbox.emails (next_attempt_at) WHERE state IN ('pending', 'sending');
-- "When did this endpoint last get an email?", for the throttling window.
CREATE INDEX emails_endpoint_created ON outbox.emails (company_id, event_type, created_at);

COMMENT ON TABLE outbox.notifications IS
    'Events that failed for good and are (or will be) reported to the endpoint''s notify_emails.';
COMMENT ON TABLE outbox.emails IS
    'Error-notification emails, one per endpoint per throttling window; written and sent by outboxd.';
