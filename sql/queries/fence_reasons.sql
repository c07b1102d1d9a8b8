-- fence_reasons: why record.sql's fence refused these outcomes ($1 event
-- ids, $2 the attempt numbers they were claimed at), so that the log says
-- what happened rather than guess. Run after the record's commit, only for
-- a group with refused outcomes (usually none: the common path pays
-- nothing); it reads the rows as they are now.
--
--   gone           the row no longer exists;
--   unclaimed      fewer attempts than the outcome's: this attempt's claim
--                  is not in the database (lost with a primary that failed
--                  before it reached a standby, or in a crash);
--   claimed_again  more attempts: the row was claimed again since, this
--                  attempt's lease having expired or been handed back;
--   not_leased     at this attempt, the row does not carry this lease any
--                  more (marked by another writer, or replayed).
SELECT o.id,
       CASE WHEN e.id IS NULL THEN 'gone'
            WHEN e.attempts < o.attempt THEN 'unclaimed'
            WHEN e.attempts > o.attempt THEN 'claimed_again'
            ELSE 'not_leased' END AS fenced,
       e.attempts AS attempts_now, e.state AS state_now
  FROM unnest($1::uuid[], $2::int[]) AS o(id, attempt)
  -- By primary key, one probe per outcome.
  LEFT JOIN LATERAL (
        SELECT x.id, x.attempts, x.state
          FROM outbox.events AS x
         WHERE x.id = o.id
         LIMIT 1) AS e ON true
