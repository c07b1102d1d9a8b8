#!/usr/bin/env bash
# How fast PostgreSQL's notify queue fills behind a listener that stopped
# reading, while eight sessions enqueue for 60 s (issue 22):
#
#   benches/stalled-listener.sh target/release/outboxd
#   benches/stalled-listener.sh OLD/outboxd          # an older enqueue
#
# The stalled listener is a session that LISTENs on outbox_events and then
# stays inside a transaction (a backend reads the queue only between
# transactions), which is what a stopped daemon's session becomes once its
# socket buffers are full. Needs pgbench and a server at DATABASE_URL
# (default the local one) with the right to create databases.
set -euo pipefail
bin=${1:?usage: $0 OUTBOXD_BINARY}
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=outboxd_bench_stalled
base=${url%%\?*}
base=${base%/*}
dburl="$base/$db"
psql -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
trap 'psql -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1' EXIT
empty=$(mktemp)
OUTBOXD_DATABASE__URL="$dburl" "$bin" --config "$empty" migrate >/dev/null
rm -f "$empty"
printf 'LISTEN outbox_events;\nBEGIN;\nSELECT pg_sleep(75);\nCOMMIT;\n' | psql -q "$dburl" >/dev/null &
sleep 1
before=$(psql -At "$dburl" -c "SELECT pg_notification_queue_usage()")
script=$(mktemp)
cat > "$script" <<'SQL'
\set id random(1, 1000000000)
SELECT outbox.enqueue_payment_cancellation(1 + :id % 1000, :id, 'Q', ARRAY[:id]);
SQL
out=$(pgbench -n -c 8 -j 2 -T 60 -f "$script" "$dburl" 2>&1)
rm -f "$script"
after=$(psql -At "$dburl" -c "SELECT pg_notification_queue_usage()")
commits=$(awk '/number of transactions actually processed/{print $NF}' <<<"$out" | cut -d/ -f1)
echo "$commits enqueuing commits in 60 s; pg_notification_queue_usage $before -> $after"
python3 -c "u = $after - $before; print('full (8 GB) in %.1f hours at this rate' % (60 / u / 3600) if u > 0 else 'less than a page of the queue used')"
wait
