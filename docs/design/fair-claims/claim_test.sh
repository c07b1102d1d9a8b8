#!/bin/bash
# run one claim file once inside a rolled-back transaction; print row count
db=$1; f=$2
PGOPTIONS="-c plan_cache_mode=force_custom_plan -c enable_seqscan=off -c enable_bitmapscan=off -c jit=off" \
psql -h 127.0.0.1 -U postgres -X -q -v ON_ERROR_STOP=1 -v lim=64 -v cap=8 -d $db <<SQL
BEGIN;
\i $f
ROLLBACK;
SQL
