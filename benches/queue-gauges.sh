#!/usr/bin/env bash
# The queue gauges' statement (sql/queries/queue_stats.sql) at a large
# pending backlog (issue 26): builds it once in a database of its own, then
# runs EXPLAIN (ANALYZE, BUFFERS) of each given version of the statement in
# turn, ROUNDS times, and prints each one's median time and shared buffers.
#
#   benches/queue-gauges.sh target/release/outboxd sql/queries/queue_stats.sql OLD.sql
#
# The backlog: PENDING pending events (default 1,000,000) over ENDPOINTS
# endpoints (default 1,000), enqueued over the last two hours, four in five
# due now and the others scheduled for a retry within the next hour; the
# first HELD endpoints (default 10) have an open circuit. Needs a server at
# DATABASE_URL (default the local one) with the right to create databases.
set -euo pipefail
bin=${1:?usage: $0 OUTBOXD_BINARY STATEMENT.sql [STATEMENT.sql ...]}
shift
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pending=${PENDING:-1000000}
endpoints=${ENDPOINTS:-1000}
held=${HELD:-10}
rounds=${ROUNDS:-7}
db=outboxd_bench_gauges
base=${url%%\?*}
base=${base%/*}
dburl="$base/$db"
if [ "${KEEP:-}" != 1 ] || ! psql -q "$dburl" -c "SELECT 1" >/dev/null 2>&1; then
    psql -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
    empty=$(mktemp)
    OUTBOXD_DATABASE__URL="$dburl" "$bin" --config "$empty" migrate >/dev/null
    rm -f "$empty"
    psql -q "$dburl" <<SQL
INSERT INTO outbox.endpoints (company_id, url)
SELECT c, 'https://erp' || c || '.example.com/hook' FROM generate_series(1, $endpoints) c;
INSERT INTO outbox.events (company_id, payload, created_at, next_attempt_at, attempts)
SELECT 1 + g % $endpoints, '{}', t, CASE WHEN g % 5 = 0 THEN now() + (g % 3600) * interval '1 second' ELSE t END,
       CASE WHEN g % 5 = 0 THEN 1 ELSE 0 END
  FROM generate_series(1, $pending) g,
       LATERAL (SELECT now() - interval '2 hours' + g * (interval '2 hours' / $pending)) AS c(t);
INSERT INTO outbox.endpoint_circuits (company_id, event_type, state, opened_at, retry_at, failures)
SELECT c, 'payment.cancellation', 'open', now() - interval '1 hour', now() + interval '1 hour', 5
  FROM generate_series(1, $held) c;
VACUUM ANALYZE outbox.events;
VACUUM ANALYZE outbox.endpoint_circuits;
SQL
fi
echo "backlog: $(psql -At "$dburl" -c "SELECT count(*) FROM outbox.events WHERE state = 'pending'") pending events, $endpoints endpoints, $held held"
declare -A times buffers
for _ in $(seq "$rounds"); do
    for sql in "$@"; do
        plan=$( (echo "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)"; cat "$sql") | psql -At "$dburl")
        read -r ms buf < <(python3 -c '
import json, sys
p = json.loads(sys.stdin.read())[0]
b = p["Plan"].get("Shared Hit Blocks", 0) + p["Plan"].get("Shared Read Blocks", 0)
print(p["Execution Time"], b)' <<<"$plan")
        times[$sql]+="$ms "
        buffers[$sql]=$buf
    done
done
for sql in "$@"; do
    python3 -c '
import statistics, sys
t = [float(x) for x in sys.argv[2].split()]
print("%-40s median %8.1f ms (min %.1f, max %.1f, %d runs), %s shared buffers" % (sys.argv[1], statistics.median(t), min(t), max(t), len(t), sys.argv[3]))' "$sql" "${times[$sql]}" "${buffers[$sql]}"
done
psql -At "$dburl" -c "SELECT 'answer of the last: ' || row_to_json(q)::text FROM ($(cat "${@: -1}")) q"
