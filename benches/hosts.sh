#!/usr/bin/env bash
# Several hosts, measured (issue 26, points 3 and 4). As root, after
# `cargo build --release`:
#
#   benches/hosts.sh                     # all of it, about 10 minutes
#   benches/hosts.sh --only lost         # or delivery, database (comma-separated)
#   benches/hosts.sh --only delivery --hosts "1 2 3 4 6 8"   # where it flattens
#   benches/hosts.sh --help
#
# 1, 2 and 3 `outboxd run` instances (or up to 8: --hosts), of this
# repository's release build and config.toml, each in a network namespace
# of its own with an address of
# its own, reach a PostgreSQL cluster and the reference receivers over a
# veth link to a bridge; nothing goes over loopback:
#
#   namespace obxd<pid>-db: bridge obxd0, 10.231.47.1/24
#       PostgreSQL (a private cluster, listening on 10.231.47.1:5432 only)
#       outboxd-receiver :8801 answering in 50 ms, :8802 answering at once
#     ├─ veth h1 ── namespace obxd<pid>-h1: eth0 10.231.47.11, outboxd run
#     ├─ veth h2 ── namespace obxd<pid>-h2: eth0 10.231.47.12, outboxd run
#     ├─ veth h3 ── namespace obxd<pid>-h3: eth0 10.231.47.13, outboxd run
#     └─ …          (h4 to h8: 10.231.47.14 to .18, when --hosts asks)
#
# The machine's own network and its PostgreSQL are not touched: the
# addresses exist only inside these namespaces, and the cluster is the
# script's own (initdb'd in a temporary directory, PostgreSQL's defaults:
# fsync on, autovacuum on, shared_buffers 128 MB). Everything (processes,
# namespaces, cluster, files) goes on exit, by an EXIT trap.
#
# delivery: the receiver answers in 50 ms, so one instance can deliver at
#   most 64 slots / 50 ms = 1,280 events/s; the database has time to spare.
# database: the receiver answers at once; the database (and the two cores
#   everything shares) is the limit.
#   Each: a backlog of N events over 1,000 companies (one endpoint each, so
#   the per-endpoint cap of 8 is never what limits), enqueued before the
#   daemons start; events/s is N over the time from the first attempt to
#   the last delivery (the database's clock). CPU per event: user + system
#   time, from /proc, from just before the daemons start to the end of the
#   drain, of the cluster's postmaster and its children (plus the children
#   that exited), of the daemons and of the receivers, over N. The machine's
#   busy cores over the same window (/proc/stat), and how much of that was
#   not ours (other work on a shared machine), are printed with each run.
#   Runs alternate: round 1 in the order 1, 2, 3 hosts, round 2 in 3, 2, 1.
#   On a machine with other work, more instances also win a larger share of
#   the cores from that work: read the "not ours" column before the ratios.
# lost: 3 instances, the 50 ms receiver, a backlog; once a quarter of it is
#   delivered, host 3's link is cut (its bridge port set down: packets to
#   and from it vanish, no connection is reset, as when a cable or a switch
#   port dies). The others deliver its events once their leases run out.
#   Checked: every event delivered, every event id arrived at the receiver,
#   duplicates counted there; timed: cut to the last delivery. Then the link
#   comes back and host 3 is watched rejoining (its late outcomes fenced).
set -Eeuo pipefail
export LC_ALL=C # sort and comm of event ids

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
# shellcheck source-path=SCRIPTDIR/..
. scripts/lib/setup.sh # _outboxd_pg_bindir

usage() {
    cat <<EOF
usage: benches/hosts.sh [options]   (as root)

  --only LIST             delivery,database,lost (default: all three)
  --hosts LIST            instance counts, default "1 2 3" (each 1 to 8)
  --rounds N              rounds of each case, alternating the order (default 2)
  --delivery-events N     backlog of the 50 ms case (default 40000)
  --database-events N     backlog of the at-once case (default 100000)
  --lost-events N         backlog of the lost-host case (default 30000)
  --companies N           companies, one endpoint each (default 1000)
  --delay D               the slow receiver's answer delay (default 50ms)
  --lease D               delivery.lease for the lost-host case (default: config.toml's)
  --concurrency N         delivery.concurrency of every instance (default: config.toml's, 64)
  --bin-dir DIR           where outboxd and outboxd-receiver are
                          (default \${CARGO_TARGET_DIR:-target}/release)
  --keep                  keep the work directory (logs) and say where
EOF
}

die() {
    echo "hosts.sh: $*" >&2
    exit 2
}
say() { echo "hosts.sh: $*" >&2; }

only="delivery,database,lost"
hosts_list="1 2 3"
rounds=2
delivery_events=40000
database_events=100000
lost_events=30000
companies=1000
delay=50ms
lease=""
concurrency=""
bin_dir=${CARGO_TARGET_DIR:-$repo/target}/release
keep=0
while (($#)); do
    case $1 in
    --only | --hosts | --rounds | --*-events | --companies | --delay | --lease | \
        --concurrency | --bin-dir)
        (($# >= 2)) || die "$1 needs a value"
        ;;
    esac
    case $1 in
    --only) only=$2 ;;
    --hosts) hosts_list=$2 ;;
    --rounds) rounds=$2 ;;
    --delivery-events) delivery_events=$2 ;;
    --database-events) database_events=$2 ;;
    --lost-events) lost_events=$2 ;;
    --companies) companies=$2 ;;
    --delay) delay=$2 ;;
    --lease) lease=$2 ;;
    --concurrency) concurrency=$2 ;;
    --bin-dir) bin_dir=$2 ;;
    --keep) keep=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
    shift 2
done
wants() { [[ ",$only," == *",$1,"* ]]; }
# Namespaces for as many hosts as the largest count (the lost host needs 3).
max_hosts=0
wants lost && max_hosts=3
for h in $hosts_list; do
    [[ $h =~ ^[1-8]$ ]] || die "--hosts: counts from 1 to 8, not $h"
    ((h > max_hosts)) && max_hosts=$h
done

((EUID == 0)) || die "needs root (ip netns, and PostgreSQL run as the postgres user)"
for tool in ip psql curl runuser awk; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
outboxd=$bin_dir/outboxd
receiver=$bin_dir/outboxd-receiver
[[ -x $outboxd && -x $receiver ]] ||
    die "no release build in $bin_dir: run cargo build --release first (or give --bin-dir)"
pg_bin=$(_outboxd_pg_bindir)
[[ -n $pg_bin ]] || die "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin"
id -u postgres >/dev/null 2>&1 || die "no postgres user to run the cluster as"

net=10.231.47
db_ns=obxd$$-db
host_ns() { echo "obxd$$-h$1"; }
tck=$(getconf CLK_TCK)
work=$(mktemp -d /tmp/outboxd-hosts.XXXXXX)
chmod 755 "$work"
pgdata=$work/pg
results=$work/results.tsv
daemon_pids=()
receiver_pids=()
daemon_lease=""

cleanup() {
    local rc=$? pid ns
    set +e
    trap - ERR
    close_psql
    for pid in "${daemon_pids[@]}" "${receiver_pids[@]}"; do
        [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null
    done
    if [[ -f $pgdata/postmaster.pid ]]; then
        (cd / && runuser -u postgres -- "$pg_bin/pg_ctl" stop -D "$pgdata" -m immediate -w -t 30 >/dev/null 2>&1)
    fi
    for ns in $(ip netns list | awk '{print $1}'); do
        if [[ $ns == "$db_ns" || $ns == obxd$$-h[1-8] ]]; then
            # Whatever still runs in a namespace of ours is ours.
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
            ip netns delete "$ns"
        fi
    done
    if ((keep)); then
        say "work directory kept: $work"
    else
        rm -rf -- "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
# set -e ends the run at a failed command; say which.
trap 'say "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the network ---------------------------------------------------------

setup_network() {
    local i ns
    ip netns add "$db_ns"
    ip -n "$db_ns" link set lo up
    ip -n "$db_ns" link add obxd0 type bridge
    ip -n "$db_ns" addr add "$net.1/24" dev obxd0
    ip -n "$db_ns" link set obxd0 up
    for ((i = 1; i <= max_hosts; i++)); do
        ns=$(host_ns "$i")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$db_ns" link add "h$i" type veth peer name eth0 netns "$ns"
        ip -n "$db_ns" link set "h$i" master obxd0
        ip -n "$db_ns" link set "h$i" up
        ip -n "$ns" addr add "$net.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
}

# --- PostgreSQL ----------------------------------------------------------

as_postgres() { (cd / && runuser -u postgres -- "$@"); }

# psql as the superuser through the cluster's socket (a file: reachable from
# here whatever the network namespace).
sql() {
    PGOPTIONS="-c client_min_messages=warning" \
        psql -h "$pgdata" -p 5432 -U postgres -X -q -At -v ON_ERROR_STOP=1 "$@"
}

start_postgres() {
    local password
    mkdir "$pgdata"
    chown postgres: "$pgdata"
    chmod 700 "$pgdata"
    as_postgres "$pg_bin/initdb" -D "$pgdata" --auth=trust -U postgres -E UTF8 \
        --locale=C.UTF-8 >/dev/null
    # The daemons come over the link, with a password; nothing else may.
    echo "host outboxd outboxd $net.0/24 scram-sha-256" >>"$pgdata/pg_hba.conf"
    (cd / && ip netns exec "$db_ns" runuser -u postgres -- "$pg_bin/pg_ctl" start \
        -D "$pgdata" -w -t 60 -l "$pgdata/postgres.log" \
        -o "-c listen_addresses=$net.1 -p 5432 -k $pgdata -c max_connections=100" \
        >/dev/null </dev/null)
    password=$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    (umask 077 && printf '%s' "$password" >"$work/db-password")
    # On stdin, not on a command line; never printed.
    sql -d postgres <<<"CREATE ROLE outboxd LOGIN PASSWORD '$password'"
}

postmaster_pid() { head -n 1 "$pgdata/postmaster.pid"; }

# CPU ticks (user + system) of the cluster: the postmaster, its children,
# and the children that exited (the postmaster's cutime + cstime).
pg_ticks() {
    local pm
    pm=$(postmaster_pid)
    # A process may end between the glob and the read: not an error.
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v pm="$pm" '{
        pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " ")
        if (pid == pm) t += f[12] + f[13] + f[14] + f[15]
        else if (f[2] == pm) t += f[12] + f[13]
    } END { print t + 0 }'
}

# User + system ticks of the given processes.
pids_ticks() {
    local pid t=0 s
    for pid in "$@"; do
        s=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        s=${s##*) }
        # shellcheck disable=SC2086 # split into fields on purpose
        set -- $s
        t=$((t + ${12} + ${13}))
    done
    echo "$t"
}

# Busy and total ticks of the whole machine (all cores), from /proc/stat.
machine_ticks() {
    awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6; exit }' /proc/stat
}

# A psql session kept open for the polls: a new connection per poll would
# start a backend each time, CPU charged to the database being measured.
psql_open=0
open_psql() {
    coproc PSQL { exec psql -h "$pgdata" -p 5432 -U postgres -d outboxd -X -q -At 2>&1; }
    # Kept apart: bash unsets PSQL when the process ends.
    psql_in=${PSQL[1]} psql_out=${PSQL[0]}
    # shellcheck disable=SC2153 # PSQL_PID is set by coproc
    psql_pid=$PSQL_PID
    psql_open=1
    polls=0
}
close_psql() {
    if ((psql_open)); then
        psql_open=0
        exec {psql_in}>&- {psql_out}<&-
        wait "$psql_pid" 2>/dev/null || true
    fi
}
# One statement that returns exactly one row, through that session; the
# row in qr. (Not meant for $(...): the count of polls must stay here.)
q() {
    printf '%s\n' "$1" >&"$psql_in"
    IFS= read -r -t 60 qr <&"$psql_out" || die "no answer from psql to: $1"
    polls=$((polls + 1))
}

# A fresh database with the schema made by the daemon's own migrate (run
# from host 1, over its link), then the endpoints and the backlog.
fresh_db() {
    local events=$1 url=$2
    close_psql
    sql -d postgres -c "DROP DATABASE IF EXISTS outboxd WITH (FORCE)" \
        -c "CREATE DATABASE outboxd OWNER outboxd"
    in_host 1
    "${in_host[@]}" "$outboxd" --config "$repo/config.toml" migrate >"$work/migrate.log" 2>&1 ||
        { cat "$work/migrate.log" >&2; die "outboxd migrate failed"; }
    sql -d outboxd >/dev/null <<SQL
INSERT INTO outbox.endpoints (company_id, url)
SELECT c, '$url' FROM generate_series(1, $companies) c;
SELECT count(outbox.enqueue_payment_cancellation(1 + g % $companies, g, 'P-' || g,
              CASE WHEN g % 2 = 0 THEN ARRAY[g, g + 1] END))
  FROM generate_series(1, $events) g;
SQL
    # Two statements: VACUUM cannot run inside a transaction block.
    sql -d outboxd -c "VACUUM ANALYZE outbox.events"
    sql -d outboxd -c "CHECKPOINT"
    open_psql
}

# --- daemons and receivers -----------------------------------------------

# The command prefix that runs a program in host $1's namespace with the
# daemon's environment, and only that (an OUTBOXD_* variable of the
# caller's would change the figures), in the array in_host. Run as a simple
# command, `"${in_host[@]}" prog &` leaves $! the program's own pid: the
# shell's child execs ip, which execs env, which execs the program.
in_host() {
    in_host=(ip netns exec "$(host_ns "$1")" env -i PATH="$PATH"
        OUTBOXD_DATABASE__URL="postgres://outboxd@$net.1:5432/outboxd"
        OUTBOXD_DATABASE__PASSWORD_FILE="$work/db-password"
        OUTBOXD_DELIVERY__ALLOWED_NETWORKS="[\"$net.0/24\"]"
        OUTBOXD_LOG__LEVEL=info)
    if [[ -n $daemon_lease ]]; then
        in_host+=(OUTBOXD_DELIVERY__LEASE="$daemon_lease")
    fi
    if [[ -n $concurrency ]]; then
        in_host+=(OUTBOXD_DELIVERY__CONCURRENCY="$concurrency")
    fi
}

# Starts instances 1..$1; their pids in daemon_pids.
start_daemons() {
    local n=$1 i t
    daemon_pids=()
    for ((i = 1; i <= n; i++)); do
        in_host "$i"
        "${in_host[@]}" "$outboxd" --config "$repo/config.toml" run \
            >"$work/daemon-h$i.log" 2>&1 </dev/null &
        daemon_pids+=("$!")
    done
    for ((i = 1; i <= n; i++)); do
        for ((t = 0; t < 300; t++)); do
            grep -qs 'outboxd is delivering' "$work/daemon-h$i.log" && break
            kill -0 "${daemon_pids[i - 1]}" 2>/dev/null ||
                { cat "$work/daemon-h$i.log" >&2; die "instance $i exited at start"; }
            sleep 0.1
        done
        ((t < 300)) || die "instance $i did not start within 30 s"
    done
}

# SIGTERM to each instance; their exit codes, space-separated, in
# exit_codes.
stop_daemons() {
    local pid codes=() rc
    for pid in "${daemon_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${daemon_pids[@]}"; do
        rc=0
        wait "$pid" || rc=$?
        codes+=("$rc")
    done
    daemon_pids=()
    exit_codes="${codes[*]}"
}

# A metric of instance $1, summed over its label sets ("" when absent).
metric() {
    ip netns exec "$(host_ns "$1")" curl -s --max-time 5 http://127.0.0.1:7464/metrics |
        awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $NF; n++ } END { if (n) print s }'
}

# outboxd-receiver in the database's namespace on port $1, with more flags;
# its pid in receiver_pid.
start_receiver() {
    local port=$1 out=$work/receiver-$1.out t
    shift
    ip netns exec "$db_ns" "$receiver" --listen "$net.1:$port" --quiet "$@" >"$out" 2>&1 </dev/null &
    receiver_pid=$!
    # Not a job of this shell's: killed at the end, never waited for.
    disown "$receiver_pid"
    receiver_pids+=("$receiver_pid")
    for ((t = 0; t < 100; t++)); do
        grep -qs '^listening on' "$out" && return 0
        sleep 0.1
    done
    die "receiver on port $port did not start"
}

due_left="SELECT count(*) FROM ((SELECT 1 FROM outbox.events WHERE state = 'pending'
             ORDER BY next_attempt_at LIMIT 1)
           UNION ALL (SELECT 1 FROM outbox.events WHERE state = 'leased'
             ORDER BY next_attempt_at LIMIT 1)) AS x"

# Waits until nothing is pending or leased, reading one index entry of each
# claim index every 100 ms, through the open session.
wait_drained() {
    local limit=$1 t0=$SECONDS
    while q "$due_left;" && [[ $qr != 0 ]]; do
        ((SECONDS - t0 < limit)) || die "not drained within $limit s"
        sleep 0.1
    done
}

commits() { sql -d postgres -c "SELECT xact_commit FROM pg_stat_database WHERE datname = 'outboxd'"; }

# --- one measured drain ----------------------------------------------------

# measure CASE HOSTS EVENTS PORT ROUND
measure() {
    local case=$1 hosts=$2 events=$3 port=$4 round=$5
    local load pg0 pg1 rx0 rx1 m0 m1 t0 t1 dmn xact0 xact1 delivered secs
    local batch_sum=0 batch_n=0 waits=0 i v shares codes
    say "$case: $hosts host(s), $events events, round $round: preloading"
    fresh_db "$events" "http://$net.1:$port/hooks/payment-cancelled"
    xact0=$(commits)
    load=$(cut -d' ' -f1 /proc/loadavg)
    read -r m0 t0 <<<"$(machine_ticks)"
    pg0=$(pg_ticks)
    rx0=$(pids_ticks "${receiver_pids[@]}")
    start_daemons "$hosts"
    say "$case: $hosts host(s): delivering"
    wait_drained 3600
    pg1=$(pg_ticks)
    rx1=$(pids_ticks "${receiver_pids[@]}")
    dmn=$(pids_ticks "${daemon_pids[@]}")
    read -r m1 t1 <<<"$(machine_ticks)"
    for ((i = 1; i <= hosts; i++)); do
        v=$(metric "$i" outboxd_claim_batch_size_sum)
        batch_sum=$(awk -v a="$batch_sum" -v b="${v:-0}" 'BEGIN { print a + b }')
        v=$(metric "$i" outboxd_claim_batch_size_count)
        batch_n=$(awk -v a="$batch_n" -v b="${v:-0}" 'BEGIN { print a + b }')
        v=$(metric "$i" outboxd_db_pool_waits_total)
        waits=$(awk -v a="$waits" -v b="${v:-0}" 'BEGIN { print a + b }')
    done
    q "SELECT count(*) FILTER (WHERE state = 'delivered') || ' ' ||
              extract(epoch FROM max(delivered_at)
                  - (SELECT min(started_at) FROM outbox.attempts))
         FROM outbox.events;"
    read -r delivered secs <<<"$qr"
    ((delivered == events)) || die "$case: $delivered of $events delivered"
    # Each instance's share, by the attempts its lease_owner (host:pid:…) made.
    q "SELECT string_agg(n::text, '/' ORDER BY o) FROM
         (SELECT split_part(lease_owner, ':', 2) AS o, count(*) AS n
            FROM outbox.attempts GROUP BY 1) AS x;"
    shares=$qr
    stop_daemons
    codes=$exit_codes
    close_psql
    sleep 1.5 # backends report their commit counts every second
    xact1=$(commits)
    awk -v c="$case" -v h="$hosts" -v r="$round" -v n="$events" -v s="$secs" \
        -v pg=$((pg1 - pg0)) -v d="$dmn" -v rx=$((rx1 - rx0)) -v tck="$tck" \
        -v mb=$((m1 - m0)) -v mt=$((t1 - t0)) -v x=$((xact1 - xact0 - polls)) \
        -v bs="$batch_sum" -v bn="$batch_n" -v w="$waits" -v l="$load" \
        -v sh="$shares" -v codes="$codes" -v ncpu="$(nproc)" 'BEGIN {
        window = mt / ncpu / tck             # seconds the window lasted
        busy = mb / tck / window             # cores busy, everything
        ours = (pg + d + rx) / tck / window  # cores busy, this benchmark
        printf "%s\t%d\t%d\t%d\t%.0f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.2f\t%.2f\t%s\t%s\t%s\t%s\n",
            c, h, r, n, n / s, pg / tck / n * 1e6, d / tck / n * 1e6, rx / tck / n * 1e6,
            n / (x > 0 ? x : 1), (bn > 0 ? bs / bn : 0), busy, busy - ours, l, w, sh, codes
    }' >>"$results"
    tail -n 1 "$results" | awk -F'\t' '{
        printf "hosts.sh:   -> %s events/s, PostgreSQL %s µs/event, machine %s cores busy (%s not ours), exit codes %s\n",
            $5, $6, $11, $12, $16 }' >&2
}

# --- the lost host ---------------------------------------------------------

lost_host() {
    local events=$lost_events port=8803 cut_at h3 i v
    local delivered all_done others_done cut_first left held lease_from lease_to
    local lines distinct missing dups dups_cut fenced expired rejoin codes
    say "lost: 3 hosts, $events events, receiver answering in $delay, host 3 cut mid-drain"
    start_receiver "$port" --delay "$delay" --arrivals
    daemon_lease=$lease
    fresh_db "$events" "http://$net.1:$port/hooks/payment-cancelled"
    start_daemons 3
    h3=${daemon_pids[2]}
    while q "SELECT count(*) FROM outbox.events WHERE state = 'delivered';" &&
        ((qr < events / 4)); do
        sleep 0.05
    done
    q "SELECT extract(epoch FROM clock_timestamp());"
    cut_at=$qr
    ip -n "$db_ns" link set h3 down
    say "lost: host 3's link cut"
    # A statement of host 3's that reached the server before the cut still
    # commits: give it a second, then note what host 3 holds.
    sleep 1
    q "CREATE TABLE public.cut_leased AS
         SELECT id, next_attempt_at AS lease_until FROM outbox.events
          WHERE state = 'leased' AND split_part(lease_owner, ':', 2) = '$h3';
       SELECT count(*) || ' ' || coalesce(round(extract(epoch FROM min(lease_until)) - $cut_at, 1), 0)
              || ' ' || coalesce(round(extract(epoch FROM max(lease_until)) - $cut_at, 1), 0)
         FROM public.cut_leased;"
    read -r held lease_from lease_to <<<"$qr"
    wait_drained 3600
    q "SELECT count(*) FILTER (WHERE state = 'delivered') || ' ' ||
              round(extract(epoch FROM max(delivered_at)) - $cut_at, 1) || ' ' ||
              coalesce(round(extract(epoch FROM max(delivered_at) FILTER (WHERE c.id IS NULL)) - $cut_at, 1), 0) || ' ' ||
              coalesce(round(extract(epoch FROM min(delivered_at) FILTER (WHERE c.id IS NOT NULL)) - $cut_at, 1), 0) || ' ' ||
              count(*) FILTER (WHERE state <> 'delivered')
         FROM outbox.events AS e LEFT JOIN public.cut_leased AS c USING (id);"
    read -r delivered all_done others_done cut_first left <<<"$qr"
    # What the receiver saw: every event id, and which came more than once.
    sql -d outboxd -c "SELECT id FROM outbox.events" | sort >"$work/ids"
    sql -d outboxd -c "SELECT id FROM public.cut_leased" | sort >"$work/cut-ids"
    awk '$1 == "arrived" { print $2 }' "$work/receiver-$port.out" | sort >"$work/arrived"
    lines=$(wc -l <"$work/arrived")
    sort -u "$work/arrived" >"$work/arrived-once"
    distinct=$(wc -l <"$work/arrived-once")
    missing=$(comm -23 "$work/ids" "$work/arrived-once" | wc -l)
    dups=$((lines - distinct))
    uniq -d "$work/arrived" >"$work/dup-ids"
    dups_cut=$(comm -12 "$work/dup-ids" "$work/cut-ids" | wc -l)
    expired=0
    for i in 1 2; do
        v=$(metric "$i" outboxd_leases_expired_total)
        expired=$((expired + ${v:-0}))
    done
    say "lost: drained; bringing host 3's link back"
    ip -n "$db_ns" link set h3 up
    # Host 3's connections resume (TCP retransmits); its late outcomes meet
    # the fence. Wait (up to a minute) for it to count them.
    fenced=""
    for ((rejoin = 0; rejoin < 60; rejoin++)); do
        fenced=$(metric 3 outboxd_outcomes_fenced_total || true)
        [[ -n $fenced && $fenced != 0 ]] && break
        sleep 1
    done
    stop_daemons
    codes=$exit_codes
    close_psql
    {
        echo "| | |"
        echo "|---|---|"
        printf '| events, companies | %s, %s |\n' "$events" "$companies"
        printf '| delivery.lease | %s |\n' \
            "${lease:-$(awk -F'"' '/^lease *=/ { print $2 }' "$repo/config.toml") (config.toml)}"
        printf '| host 3 held at the cut (leased to it, outcome not recorded) | %s events; their leases ran out %s to %s s after the cut |\n' \
            "$held" "$lease_from" "$lease_to"
        printf '| the rest of the backlog: last delivered by hosts 1 and 2 | %s s after the cut |\n' "$others_done"
        printf "| host 3's events: first / last delivered by hosts 1 and 2 | %s s / %s s after the cut |\n" "$cut_first" "$all_done"
        printf '| every event delivered | %s of %s (not delivered: %s) |\n' "$delivered" "$events" "$left"
        printf '| every event id arrived at the receiver | %s distinct ids of %s (never arrived: %s) |\n' "$distinct" "$events" "$missing"
        printf "| duplicates at the receiver | %s (%s of them among host 3's held events) |\n" "$dups" "$dups_cut"
        printf '| leases hosts 1 and 2 found expired (outboxd_leases_expired_total) | %s |\n' "$expired"
        printf '| host 3 once its link came back: outcomes fenced | %s (counted %s s after) |\n' "${fenced:-none}" "$rejoin"
        printf '| exit codes after SIGTERM (h1 h2 h3) | %s |\n' "$codes"
        printf '| load average at the end | %s |\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    } >"$work/lost.md"
    say "lost: done"
}

# --- the report ------------------------------------------------------------

report() {
    local case slots
    slots=${concurrency:-$(awk '/^concurrency *=/ { print $3; exit }' "$repo/config.toml")}
    echo
    echo "Machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)," \
        "$("$pg_bin/postgres" --version), $("$outboxd" --version 2>/dev/null | head -n 1)," \
        "$(date -u '+%Y-%m-%d %H:%M UTC')"
    for case in delivery database; do
        grep -q "^$case	" "$results" 2>/dev/null || continue
        echo
        if [[ $case == delivery ]]; then
            echo "Delivery-bound (receiver answers in $delay), $delivery_events events, $companies companies, concurrency $slots:"
        else
            echo "Database-bound (receiver answers at once), $database_events events, $companies companies, concurrency $slots:"
        fi
        echo
        echo "| hosts | round | events/s | PostgreSQL µs/event | daemons µs/event | receiver µs/event | events/transaction | mean claim batch | machine busy, cores (not ours) | load at start | pool waits | attempts per instance |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' -v c="$case" '$1 == c {
            printf "| %d | %d | %s | %s | %s | %s | %s | %s | %s (%s) | %s | %s | %s |\n",
                $2, $3, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15 }' "$results" | sort -t'|' -k2,2n -k3,3n
        echo
        echo "| hosts | events/s (mean) | × 1 host | PostgreSQL µs/event (mean) |"
        echo "|---|---|---|---|"
        awk -F'\t' -v c="$case" '$1 == c { n[$2]++; r[$2] += $5; p[$2] += $6 }
            END { base = n[1] ? r[1] / n[1] : 0
                  for (h = 1; h <= 8; h++) if (n[h])
                      printf "| %d | %.0f | %s | %.1f |\n", h, r[h] / n[h],
                          base ? sprintf("%.2f", r[h] / n[h] / base) : "-", p[h] / n[h] }' "$results"
    done
    if [[ -f $work/lost.md ]]; then
        echo
        echo "Host 3's link cut mid-drain (3 hosts, receiver answering in $delay):"
        echo
        cat "$work/lost.md"
    fi
}

# --- main --------------------------------------------------------------------

say "work directory $work; load average $(cut -d' ' -f1-3 /proc/loadavg)"
setup_network
start_postgres
say "PostgreSQL $("$pg_bin/postgres" --version | awk '{ print $3 }') at $net.1:5432 in $db_ns"

if wants delivery || wants database; then
    start_receiver 8801 --delay "$delay"
    start_receiver 8802
    daemon_lease=""
    for ((round = 1; round <= rounds; round++)); do
        order=$hosts_list
        ((round % 2 == 0)) && order=$(tr ' ' '\n' <<<"$hosts_list" | sort -rn | tr '\n' ' ')
        for h in $order; do
            wants delivery && measure delivery "$h" "$delivery_events" 8801 "$round"
            wants database && measure database "$h" "$database_events" 8802 "$round"
        done
    done
fi
if wants lost; then
    lost_host
fi
report
