-- begin_durable: opens the explicit transaction a claim or a group of
-- outcomes runs in (src/store/txn.rs sends it, the statement and COMMIT
-- together, in one round trip), so that the statement's rows are used only
-- once the COMMIT's reply says they are committed. In an implicit
-- transaction PostgreSQL sends the rows and CommandComplete before it
-- commits: with a synchronous standby the commit may still be waiting, or
-- never become durable there, while the rows are already in use.
--
-- The pooled sessions commit with synchronous_commit = off (store/pool.rs:
-- a crash may lose the last fraction of a second of claims and marks, a
-- price paid for throughput). That setting also skips the wait for a
-- synchronous standby, so a claim or a mark acknowledged by the primary
-- could be missing on the standby promoted after it fails: the event sent
-- again, its outcome refused. When the server names synchronous standbys
-- (synchronous_standby_names), this transaction waits for them as the
-- operator asked ('on': flushed there); without any, nothing changes. A
-- stronger setting of the operator's own (remote_apply) is kept.
BEGIN;
SELECT set_config('synchronous_commit', 'on', true)
 WHERE current_setting('synchronous_standby_names') <> ''
   AND current_setting('synchronous_commit') IN ('off', 'local');
