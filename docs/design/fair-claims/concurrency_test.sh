#!/bin/bash
# Two sessions claim at once: session 1 holds its claim transaction open 3 s; session 2 claims meanwhile.
# Checks: PostgreSQL accepts the locking clauses, SKIP LOCKED gives disjoint sets, and what the cap does.
db=$1; f=$2; out=/tmp/claim-research/runs
run() { { echo "SET enable_seqscan=off; SET enable_bitmapscan=off; SET jit=off;"; echo "BEGIN;"; echo "\\o $out/conc_$1.txt"; cat $f; echo ";"; echo "\\o"; echo "SELECT pg_sleep($2);"; echo "COMMIT;"; } | psql -h 127.0.0.1 -U postgres -X -q -At -v lim=64 -v cap=8 -d $db > /dev/null; }
createdb -h 127.0.0.1 -U postgres -T $db ${db}_conc || exit 1
db=${db}_conc
run s1 3 & sleep 0.5; run s2 0; wait
n1=$(wc -l < $out/conc_s1.txt); n2=$(wc -l < $out/conc_s2.txt)
both=$(cut -d'|' -f1 $out/conc_s1.txt $out/conc_s2.txt | sort | uniq -d | wc -l)
echo "$(basename $f) on $db: session1 $n1 rows, session2 $n2 rows, claimed by both: $both"
psql -h 127.0.0.1 -U postgres -X -At -d $db -c "SELECT 'max live leases per endpoint after both (cap 8): ' || max(n) FROM (SELECT count(*) n FROM outbox.events WHERE state='leased' AND next_attempt_at > now() GROUP BY company_id, event_type) x"
dropdb -h 127.0.0.1 -U postgres $db
