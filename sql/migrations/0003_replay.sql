-- 0003: replaying failed events.
--
-- A replay (`outboxd events retry`) puts a failed event back to pending with
-- the same id, so the receiver sees the same Idempotency-Key, and keeps its
-- attempt history. `attempts` keeps counting (attempt rows are keyed by it),
-- so the retry budget and the age limit start again from the replay:
--   attempts used since the replay = attempts - attempts_at_replay
--   age for the retry policy        = now() - coalesce(replayed_at, created_at)
ALTER TABLE outbox.events
    ADD COLUMN replayed_at        timestamptz,
    ADD COLUMN attempts_at_replay integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT events_attempts_at_replay_in_range
        CHECK (attempts_at_replay >= 0 AND attempts_at_replay <= attempts),
    -- A claim adds one to attempts. A row written by hand near the integer
    -- limit would make every claim fail with "integer out of range" and stop
    -- all deliveries; no real event gets anywhere near a million attempts
    -- (at most retry.max_attempts, at most 1,000, per replay).
    ADD CONSTRAINT events_attempts_bounded CHECK (attempts <= 1000000);

COMMENT ON COLUMN outbox.events.replayed_at IS
    'When the event was last put back to pending by a replay (NULL: never).';
