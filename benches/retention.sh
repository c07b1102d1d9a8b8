#!/usr/bin/env bash
# Retention at volume (issue 26, point 5): how fast the retention cleanup
# (sql/queries/retention.sql, run by `outboxd run`'s maintenance) deletes a
# large history of finished events, and what it costs a drain meanwhile.
#
#   benches/retention.sh                      # 20 million finished events
#   ROWS=2000000 ROUNDS=2 benches/retention.sh   # a quick look
#
# Builds the release binaries, then, on a database of its own
# (outboxd_bench_retention, dropped at the end, also on failure):
# 1. `outboxd migrate`, then ROWS finished events written with INSERT ...
#    SELECT generate_series, created 70 to 31 days ago (so all of them are
#    past retention.delivered and retention.failed): one in 50 failed after
#    3 attempts, the others delivered at the first; ids are UUIDv7 built
#    from created_at, one attempt row per attempt, as a delivery leaves
#    them. Then VACUUM ANALYZE and a checkpoint, as an old table would be.
# 2. ROUNDS rounds of: a drain of DRAIN events (100 companies, the reference
#    receiver) with retention off (retention.delivered/failed/emails =
#    3650days: the query runs and finds nothing) and one with retention on
#    (the shipped config.toml), in alternating order; then the daemon alone
#    for ALONE_SECONDS with retention on and nothing to deliver.
#    Drain rate: events over first attempt to last delivery (database
#    clock). Deletion rate: outbox.events' n_tup_del sampled every 0.5 s,
#    over the same window.
# 3. Sizes of outbox.events and outbox.attempts and of each index after the
#    load and after each phase; their free space as the free space map
#    knows it (pg_freespacemap), i.e. space a later insert reuses.
#
# Vacuum: if the server's autovacuum is off (as on the development VM), a
# stand-in vacuums a table whenever autovacuum would (the thresholds that
# migration 4 sets: 2% of outbox.events dead, 5% of outbox.attempts), with
# autovacuum's default throttle (cost delay 2 ms, limit 200), checked every
# 5 s; each phase starts once no vacuum runs and none is due. VACUUM=none
# turns it off (what a server without autovacuum gets). With autovacuum
# on, the server's own runs.
#
# Needs psql and a server at DATABASE_URL (default the local one) with the
# right to create databases, on this machine, with about 570 bytes of disk
# per event (11 GB for 20 million) plus WAL. About 35 minutes on 2 cores.
set -euo pipefail

ROWS=${ROWS:-20000000}
DRAIN=${DRAIN:-200000}
ROUNDS=${ROUNDS:-3}
ALONE_SECONDS=${ALONE_SECONDS:-60}
VACUUM=${VACUUM:-standin}
CHUNK=1000000
COMPANIES=100

repo=$(cd "$(dirname "$0")/.." && pwd)
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=outboxd_bench_retention
base=${url%%\?*}
base=${base%/*}
dburl="$base/$db"
work=$(mktemp -d)

(cd "$repo" && cargo build --release --bins --quiet)
bin=${CARGO_TARGET_DIR:-$repo/target}/release

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

q() { psql -X -At -v ON_ERROR_STOP=1 "$dburl" "$@"; }
say() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; load $(uptime | sed 's/.*load average: //')"
echo "disk before: $(df -h --output=avail "$(psql -X -At "$url" -c 'SHOW data_directory')" 2>/dev/null | tail -1 || echo '?') free"

psql -X -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
empty="$work/empty.toml"
: > "$empty"
OUTBOXD_DATABASE__URL="$dburl" "$bin/outboxd" --config "$empty" migrate >/dev/null
q -c "CREATE EXTENSION pg_freespacemap" >/dev/null
autovacuum=$(q -c "SHOW autovacuum")
[ "$autovacuum" = on ] && VACUUM=server
echo "server: $(q -c "SELECT current_setting('server_version')"), shared_buffers $(q -c 'SHOW shared_buffers'), autovacuum $autovacuum; vacuum in this run: $VACUUM"

# The receiver, and one endpoint per company pointing at it (the history's
# 1,000 companies; the drains use the first 100).
"$bin/outboxd-receiver" --listen 127.0.0.1:0 --quiet > "$work/receiver.out" &
pids+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$work/receiver.out" 2>/dev/null && break; sleep 0.1; done
receiver=$(sed -n 's/^listening on //p' "$work/receiver.out")
q -c "INSERT INTO outbox.endpoints (company_id, url)
      SELECT c, '$receiver/hooks/payment-cancelled' FROM generate_series(1, 1000) c" >/dev/null

# 1. The history.
say "writing $ROWS finished events"
load_started=$(date +%s.%N)
span_ms=$((39 * 86400 * 1000))
for ((lo = 1; lo <= ROWS; lo += CHUNK)); do
    hi=$((lo + CHUNK - 1 < ROWS ? lo + CHUNK - 1 : ROWS))
    q -q -v lo="$lo" -v hi="$hi" -v rows="$ROWS" -v span_ms="$span_ms" <<'SQL'
-- Foreign keys are known to hold here: skip their per-row checks.
SET session_replication_role = replica;
WITH g AS (
    SELECT g, now() - interval '31 days'
              - ((:rows - g)::float8 * :span_ms / :rows) * interval '1 millisecond' AS at
      FROM generate_series(:lo::bigint, :hi::bigint) g
), ev AS (
    INSERT INTO outbox.events (id, company_id, payload, state, attempts, next_attempt_at,
                               lease_owner, created_at, delivered_at, response_message, last_error)
    SELECT -- outbox.uuid_v7() at created_at rather than at the clock
           encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                  PLACING substring(int8send((extract(epoch FROM at) * 1000)::bigint) FROM 3)
                  FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid,
           1 + g % 1000,
           jsonb_build_object('companyId', 1 + g % 1000, 'paymentId', g,
                              'paymentNumber', 'P-' || g, 'orderIds', g || ',' || g + 1),
           CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'delivered' END,
           CASE WHEN g % 50 = 0 THEN 3 ELSE 1 END,
           at, 'bench-host:4242', at,
           CASE WHEN g % 50 <> 0 THEN at + interval '40 milliseconds' END,
           CASE WHEN g % 50 = 0 THEN 'Payment not found' ELSE 'Payment cancellation received' END,
           CASE WHEN g % 50 = 0 THEN 'rejected by the receiver' END
      FROM g
    RETURNING id, state, created_at, attempts
)
INSERT INTO outbox.attempts (event_id, attempt, started_at, duration_ms, http_status, outcome,
                             message, lease_owner)
SELECT ev.id, a, ev.created_at + (a - 1) * interval '30 seconds', 38,
       CASE WHEN ev.state = 'failed' AND a < 3 THEN 503 ELSE 200 END,
       CASE WHEN ev.state = 'delivered' THEN 'success' WHEN a < 3 THEN 'retryable' ELSE 'rejected' END,
       CASE WHEN ev.state = 'delivered' THEN 'Payment cancellation received'
            WHEN a < 3 THEN 'HTTP 503' ELSE 'Payment not found' END,
       'bench-host:4242'
  FROM ev, generate_series(1, ev.attempts) a;
SQL
    say "  $hi"
done
load_seconds=$(echo "$(date +%s.%N) - $load_started" | bc)
say "vacuum analyze, checkpoint"
q -c "VACUUM ANALYZE outbox.events" -c "VACUUM ANALYZE outbox.attempts" -c "CHECKPOINT" >/dev/null
echo "history: $ROWS events in $(printf %.0f "$load_seconds") s ($(echo "$ROWS / $load_seconds" | bc) rows/s)"

sizes() { # $1 = label
    q -F ' ' -c "
      SELECT '$1', c.relname,
             pg_relation_size(c.oid) / 1048576,
             coalesce((SELECT sum(avail) FROM pg_freespace(c.oid)), 0) / 1048576
        FROM pg_class c
       WHERE c.relnamespace = 'outbox'::regnamespace
         AND c.relname IN ('events', 'attempts')
          OR c.oid IN (SELECT indexrelid FROM pg_index
                        WHERE indrelid IN ('outbox.events'::regclass, 'outbox.attempts'::regclass))
       ORDER BY c.relname" >> "$work/sizes"
    q -c "SELECT '$1', (SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = 'outbox.events'::regclass),
                 (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'outbox.events'::regclass),
                 pg_total_relation_size('outbox.events') / 1048576,
                 pg_total_relation_size('outbox.attempts') / 1048576" -F ' ' >> "$work/totals"
}
sizes loaded

# The deletion counter, sampled, by the database's clock.
echo "SELECT extract(epoch FROM clock_timestamp())::numeric(16,3), n_tup_del
        FROM pg_stat_user_tables WHERE relid = 'outbox.events'::regclass \watch 0.5" |
    psql -X -At -F ' ' "$dburl" > "$work/deleted" 2>/dev/null &
pids+=($!)

# The vacuum stand-in (see the top).
vacuum_running="$work/vacuum.running"
if [ "$VACUUM" = standin ]; then
    (
        # A failed look or vacuum (a connection ended by someone else) must
        # not end the stand-in, nor leave its flag behind.
        set +e
        while sleep 5; do
            for t in "events 0.02" "attempts 0.05"; do
                set -- $t
                due=$(q -c "SELECT n_dead_tup > 50 + $2 * greatest(c.reltuples, 0)
                              FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
                             WHERE s.relid = 'outbox.$1'::regclass")
                if [ "$due" = t ]; then
                    touch "$vacuum_running"
                    started=$(date +%s.%N)
                    q -c "SET vacuum_cost_delay = '2ms'" -c "SET vacuum_cost_limit = 200" \
                      -c "VACUUM outbox.$1" >/dev/null
                    result=$([ $? = 0 ] && echo s || echo "s, failed")
                    echo "$(date -u +%H:%M:%S) vacuum outbox.$1 $(echo "$(date +%s.%N) - $started" | bc | xargs printf %.1f) $result" >> "$work/vacuums"
                    rm -f "$vacuum_running"
                fi
            done
        done
    ) &
    pids+=($!)
fi
vacuum_due() {
    q -c "SELECT bool_or(n_dead_tup > 50 + CASE s.relname WHEN 'events' THEN 0.02 ELSE 0.05 END
                                         * greatest(c.reltuples, 0))
            FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
           WHERE s.relid IN ('outbox.events'::regclass, 'outbox.attempts'::regclass)"
}
# Waits until no vacuum runs and none is due, so that a phase does not
# inherit the vacuum of the one before.
vacuum_quiet() {
    [ "$VACUUM" = standin ] || return 0
    while [ -e "$vacuum_running" ] || [ "$(vacuum_due)" = t ]; do sleep 1; done
}

daemon_start() { # $1 = on|off
    local env=()
    if [ "$1" = off ]; then
        env=(OUTBOXD_RETENTION__DELIVERED=3650days OUTBOXD_RETENTION__FAILED=3650days
             OUTBOXD_RETENTION__EMAILS=3650days)
    fi
    env "${env[@]}" OUTBOXD_DATABASE__URL="$dburl" \
        OUTBOXD_DELIVERY__ALLOWED_NETWORKS='["127.0.0.0/8"]' \
        OUTBOXD_METRICS__LISTEN=off OUTBOXD_LOG__LEVEL=info \
        "$bin/outboxd" --config "$repo/config.toml" run 2> "$work/daemon.log" &
    daemon=$!
    pids+=($daemon)
    for _ in $(seq 300); do grep -q 'outboxd is delivering' "$work/daemon.log" && return; sleep 0.1; done
    cat "$work/daemon.log" >&2
    exit 1
}
daemon_stop() {
    kill -TERM "$daemon"
    wait "$daemon" || true
    cat "$work/daemon.log" >> "$work/daemon.all.log"
}

# Events deleted per second between two database-clock instants.
deleted_rate() { # $1 $2 = epoch seconds
    awk -v a="$1" -v b="$2" '$1 >= a && $1 <= b { if (!n++) { t0 = $1; d0 = $2 } t1 = $1; d1 = $2 }
        END { if (t1 > t0) printf "%.0f", (d1 - d0) / (t1 - t0); else print "?" }' "$work/deleted"
}

next_payment=1
drain() { # $1 = on|off, $2 = round
    local mode=$1 round=$2
    vacuum_quiet
    q -c "SELECT count(outbox.enqueue_payment_cancellation(1 + g % $COMPANIES, g, 'P-' || g,
                 CASE WHEN g % 2 = 0 THEN ARRAY[g, g + 1] END))
            FROM generate_series($next_payment::bigint, $((next_payment + DRAIN - 1))::bigint) g" >/dev/null
    next_payment=$((next_payment + DRAIN))
    q -c "CHECKPOINT" >/dev/null
    local t0
    t0=$(q -c "SELECT now()")
    say "round $round: drain of $DRAIN with retention $mode"
    daemon_start "$mode"
    while [ -n "$(q -c "(SELECT 1 FROM outbox.events WHERE state = 'pending' ORDER BY next_attempt_at LIMIT 1)
                        UNION ALL (SELECT 1 FROM outbox.events WHERE state = 'leased' ORDER BY next_attempt_at LIMIT 1)
                        LIMIT 1")" ]; do
        sleep 0.2
    done
    sleep 1.5 # the retention's last deletions reach the statistics
    daemon_stop
    local window
    window=$(q -F ' ' -c "
        WITH mine AS (SELECT id, delivered_at FROM outbox.events
                       WHERE state = 'delivered' AND delivered_at >= '$t0')
        SELECT extract(epoch FROM (SELECT min(a.started_at) FROM mine JOIN outbox.attempts a ON a.event_id = mine.id)),
               extract(epoch FROM (SELECT max(delivered_at) FROM mine)),
               (SELECT count(*) FROM mine)")
    set -- $window
    local rate deleted
    rate=$(echo "$3 / ($2 - $1)" | bc)
    deleted=$(deleted_rate "$1" "$2")
    echo "$round $mode $rate $deleted $3" >> "$work/drains"
    echo "round $round drain, retention $mode: $rate events/s ($3 events); events deleted meanwhile $deleted/s"
    sizes "round$round-drain-$mode"
}

alone() { # $1 = round
    vacuum_quiet
    say "round $1: retention alone for $ALONE_SECONDS s"
    local t0 t1
    daemon_start on
    t0=$(q -c "SELECT extract(epoch FROM clock_timestamp())")
    sleep "$ALONE_SECONDS"
    t1=$(q -c "SELECT extract(epoch FROM clock_timestamp())")
    daemon_stop
    local deleted
    deleted=$(deleted_rate "$t0" "$t1")
    echo "$1 $deleted" >> "$work/alone"
    echo "round $1 retention alone: $deleted events deleted/s"
    sizes "round$1-alone"
}

for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then drain off "$r"; drain on "$r"; else drain on "$r"; drain off "$r"; fi
    alone "$r"
done
vacuum_quiet
if [ "$VACUUM" != none ]; then
    # What autovacuum would leave: every dead row version gone.
    q -c "VACUUM outbox.events" -c "VACUUM outbox.attempts" >/dev/null
fi
sizes end

echo
echo "Drains ($DRAIN events, 100 companies), events/s, and events deleted per second meanwhile:"
echo "| round | retention off | retention on | on/off | deleted/s during the drain |"
echo "|---|---|---|---|---|"
awk '{ d[$1, $2] = $3; x[$1] = $4 } $2 == "on" { del[$1] = $4 } END {
        for (r = 1; r in del; r++) printf "| %d | %s | %s | %.2f | %s |\n", r, d[r, "off"], d[r, "on"], d[r, "on"] / d[r, "off"], del[r] }' "$work/drains"
echo
echo "Retention alone (nothing to deliver), events deleted per second: $(awk '{printf "%s%s", sep, $2; sep=", "}' "$work/alone")"
total=$(awk 'NR == 1 { d0 = $2 } { d1 = $2 } END { print d1 - d0 }' "$work/deleted")
echo "Events deleted in all: $total (and their attempt rows)"
echo "Events deleted per second, by minute of the run (database clock; the minutes in which some were):"
awk '{ m = int($1 / 60); if (!(m in first)) { first[m] = $2; order[++n] = m } last[m] = $2 }
     END { for (i = 1; i <= n; i++) { m = order[i]; d = (i < n ? first[order[i + 1]] : last[m]) - first[m]
           if (d > 0) printf "  %s %.0f/s\n", strftime("%H:%M", m * 60, 1), d / 60 } }' "$work/deleted"
if [ -e "$work/vacuums" ]; then
    echo "Vacuums (stand-in): $(wc -l < "$work/vacuums")"
    sed 's/^/  /' "$work/vacuums"
fi
echo
echo "Sizes, MiB (free = what the free space map offers to later inserts):"
echo "| relation | after the load | free | at the end | free |"
echo "|---|---|---|---|---|"
awk '$1 == "loaded" { a[$2] = $3; af[$2] = $4; order[++n] = $2 } $1 == "end" { e[$2] = $3; ef[$2] = $4 }
     END { for (i = 1; i <= n; i++) printf "| %s | %s | %s | %s | %s |\n", order[i], a[order[i]], af[order[i]], e[order[i]], ef[order[i]] }' "$work/sizes"
echo
echo "Live/dead events and total sizes (MiB, events with indexes, attempts with index) by phase:"
sed 's/^/  /' "$work/totals"
echo "load at the end: $(uptime | sed 's/.*load average: //')"
