#!/bin/bash
# bench.sh DB CLAIMFILE [seconds] [clients]: pgbench BEGIN; claim; ROLLBACK; repeated (data stays the same),
# pooled-session SETs, VACUUM first. Prints: db file median_ms p90_ms tps n rows_returned
db=$1; f=$2; T=${3:-10}; C=${4:-1}
out=/tmp/claim-research/runs; mkdir -p $out
s=$out/$(basename $f .sql).pgb
{ echo "BEGIN;"; grep -v '^\s*--' $f | sed 's/--.*$//' ; echo ";"; echo "ROLLBACK;"; } > $s
psql -h 127.0.0.1 -U postgres -X -q -d $db -c "VACUUM outbox.events" >/dev/null
rows=$(./claim_test.sh $db $f | grep -oE '^\(([0-9]+) rows?\)' | grep -oE '[0-9]+')
rm -f $out/pgbench_log.*
( cd $out && PGOPTIONS="-c plan_cache_mode=force_custom_plan -c enable_seqscan=off -c enable_bitmapscan=off -c jit=off -c synchronous_commit=off" \
  pgbench -h 127.0.0.1 -U postgres -n -f $s -D lim=64 -D cap=8 -T $T -c $C -j $C -l $db > $out/last.txt 2>&1 ) || { cat $out/last.txt; exit 1; }
tps=$(grep -oE 'tps = [0-9.]+' $out/last.txt | head -1 | awk '{print $3}')
cat $out/pgbench_log.* | awk '{print $3/1000}' | sort -n | awk -v db=$db -v f=$(basename $f) -v tps=$tps -v rows=$rows \
  '{a[NR]=$1} END {printf "%-15s %-26s median=%8.3f ms  p90=%8.3f ms  tps=%8.1f  n=%6d  rows=%s\n", db, f, a[int(NR/2)+1], a[int(NR*0.9)+1], tps, NR, rows}'
