-- replay: `outboxd events retry`. Puts failed events back to pending, due
-- now, with the same id (so the receiver sees the same Idempotency-Key). The
-- attempt rows stay; `attempts` keeps counting, and attempts_at_replay and
-- replayed_at restart the retry budget and the age limit from here (see
-- migration 0003). response_message stays until the next answer replaces
-- it. Guarded by state: only failed events move, so a replay can never
-- disturb an event that is pending, leased or delivered. Returns the ids
-- that moved.
--
--  $1 uuid[]  event ids
UPDATE outbox.events
   SET state = 'pending',
       next_attempt_at = now(),
       replayed_at = now(),
       attempts_at_replay = attempts,
       last_error = NULL,
       lease_owner = NULL
 WHERE id = ANY($1)
   AND state = 'failed'
RETURNING id
