//! The plain claim keeps one plan per connection (`db::claim_pool`), made
//! without its parameters from the statistics of the moment it first runs.
//! These tests make that plan on the worst statistics there are, an
//! analysed empty table, then run it on a table of thousands of rows and
//! read what it touched.
//!
//! "What it touched" has to be something a plan reading the whole table
//! would get wrong. A scan's actual rows are not: a sequential scan that
//! filters 6,000 rows down to the one due reports 1, as the index walk
//! does. So the plan is judged on the index it walks, the rows it threw
//! away and the pages it read ([`faults`]), and the judgement is checked to
//! condemn the plans PostgreSQL makes without the index.

use serde_json::Value;

use crate::harness::TestDb;

const CLAIM_SQL: &str = include_str!("../../sql/queries/claim.sql");

/// The claim of one event, as the daemon runs it (`$1` = 1: the quiet
/// queue, one event per claim).
const PARAMS: &str = "(1, 'a', 60000, 8, '{}', '{}', '{}', '{}', '{}', '{}', '{}', 32, 16)";

/// Pages the search for the due rows may read: the index's root and leaf
/// and the due row's heap page, with room to spare (measured: 4). Without
/// the index, reading this table takes 40 (all pending entries of
/// `events_endpoint_pending`) to 160 (every heap page).
const MAX_DUE_PAGES: f64 = 10.0;

/// Every plan node of an `EXPLAIN (ANALYZE, FORMAT JSON)` tree.
fn nodes<'a>(plan: &'a Value, out: &mut Vec<&'a Value>) {
    out.push(plan);
    for child in plan["Plans"].as_array().into_iter().flatten() {
        nodes(child, out);
    }
}

fn number(node: &Value, key: &str) -> f64 {
    node[key].as_f64().unwrap_or(0.0)
}

/// What is wrong with a claim's `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`,
/// each fault tagged with what it is about: `index` (the due rows do not
/// come from the ordered walk of `events_pending_due`), `filter` (rows of
/// outbox.events read and thrown away), `rows` (a scan of outbox.events
/// returned more rows than one claimed event needs), `pages` (the search
/// for the due rows read more than [`MAX_DUE_PAGES`]).
fn faults(explained: &Value) -> Vec<(&'static str, String)> {
    let mut all = Vec::new();
    nodes(&explained[0]["Plan"], &mut all);
    let mut faults = Vec::new();
    if !all
        .iter()
        .any(|n| n["Relation Name"] == "events" && n["Index Name"] == "events_pending_due")
    {
        faults.push((
            "index",
            "outbox.events is not read through events_pending_due".into(),
        ));
    }
    for node in all.iter().filter(|n| n["Relation Name"] == "events") {
        let thrown =
            number(node, "Rows Removed by Filter") + number(node, "Rows Removed by Index Recheck");
        if thrown > 0.0 {
            faults.push((
                "filter",
                format!("{thrown} rows read and thrown away: {node:#}"),
            ));
        }
        let read = number(node, "Actual Rows") * number(node, "Actual Loops");
        if read > 1.0 {
            faults.push(("rows", format!("{read} rows read to claim one: {node:#}")));
        }
    }
    match all.iter().find(|n| n["Subplan Name"] == "CTE due") {
        Some(due) => {
            let pages = number(due, "Shared Hit Blocks") + number(due, "Shared Read Blocks");
            if pages > MAX_DUE_PAGES {
                faults.push((
                    "pages",
                    format!("{pages} pages read to find the due rows: {due:#}"),
                ));
            }
        }
        None => faults.push(("pages", "no CTE due in the plan".into())),
    }
    faults
}

/// A claim connection of the daemon's (its plan kept) with `sql` prepared
/// as `kept` and run once, so that its plan is made on empty tables that
/// ANALYZE saw empty: the worst statistics there are.
async fn plan_kept_on_empty_tables(
    db: &TestDb,
    sql: &str,
    params: &str,
) -> deadpool_postgres::Object {
    let admin = db.client().await;
    for table in ["events", "endpoints", "endpoint_circuits"] {
        admin
            .batch_execute(&format!("VACUUM ANALYZE outbox.{table}"))
            .await
            .unwrap();
    }
    let claimer = db.claim_pool().get().await.unwrap();
    claimer
        .batch_execute(&format!("PREPARE kept AS {sql}"))
        .await
        .unwrap();
    assert!(
        claimer
            .query(&format!("EXECUTE kept{params}"), &[])
            .await
            .unwrap()
            .is_empty()
    );
    claimer
}

/// `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` of the prepared statement `name`.
async fn explain(client: &tokio_postgres::Client, name: &str, params: &str) -> Value {
    client
        .query_one(
            &format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}{params}"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// That `judge` can fail: `sql` planned in each of `cases` (a name, the
/// setting that takes the index away, the kinds of fault the judgement must
/// find), in transactions that are rolled back (so the due event stays
/// due, and the kept plan is not touched: a rolled back DROP INDEX
/// invalidates no other session's plans).
async fn assert_judgement_condemns(
    db: &TestDb,
    sql: &str,
    params: &str,
    cases: &[(&str, &str, &[&str])],
    judge: fn(&Value) -> Vec<(&'static str, String)>,
) {
    let other = db.claim_pool().get().await.unwrap();
    for (name, setup, want) in cases {
        other
            .batch_execute(&format!("BEGIN; {setup}; PREPARE {name} AS {sql}"))
            .await
            .unwrap();
        let explained = explain(&other, name, params).await;
        other.batch_execute("ROLLBACK").await.unwrap();
        let found = judge(&explained);
        for kind in *want {
            assert!(
                found.iter().any(|(k, _)| k == kind),
                "{name}: the judgement misses a fault of kind {kind} in {found:#?}"
            );
        }
    }
}

#[tokio::test]
async fn the_plain_claims_kept_plan_reads_only_the_rows_it_claims_however_the_table_grew() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    // The plan is made here, on empty tables that ANALYZE saw empty.
    let claimer = plan_kept_on_empty_tables(&db, CLAIM_SQL, PARAMS).await;

    // Then the outbox fills, all of it enqueued before the one due event
    // and lying in front of it in the table: 6,000 events, delivered or
    // failed, in flight on another instance, or pending with their retry an
    // hour away. Written in those states rather than walked there, so
    // events_pending_due holds no entries of rows that left it: until a
    // vacuum those are walked by every plan, this one included, and would
    // hide what the plan itself reads.
    admin
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'http://127.0.0.1:9/hooks' FROM generate_series(1, 20) c;
             INSERT INTO outbox.events
                    (company_id, payload, state, next_attempt_at, delivered_at, lease_owner)
             SELECT 1 + g % 20,
                    jsonb_build_object('companyId', 1 + g % 20, 'paymentId', g, 'paymentNumber', g::text),
                    s.state,
                    CASE s.state WHEN 'pending' THEN now() + interval '1 hour'
                                 WHEN 'leased' THEN now() + interval '1 minute'
                                 ELSE now() - interval '1 hour' END,
                    CASE s.state WHEN 'delivered' THEN now() END,
                    CASE s.state WHEN 'leased' THEN 'another-instance' END
               FROM generate_series(1, 6000) g,
                    LATERAL (SELECT CASE WHEN g % 10 = 0 THEN 'failed'
                                         WHEN g % 10 = 1 THEN 'leased'
                                         WHEN g % 10 < 6 THEN 'pending'
                                         ELSE 'delivered' END AS state) AS s;
             SELECT outbox.enqueue_payment_cancellation(7, 99999, 'due');",
        )
        .await
        .unwrap();

    // First, that the judgement can fail: the same claim, planned without
    // the ordered walk, in transactions that are rolled back (so the due
    // event stays due, and the kept plan above is not touched: a rolled
    // back DROP INDEX invalidates no other session's plans). Without the
    // index the planner walks all of events_endpoint_pending and sorts;
    // with index scans off, it reads the table.
    assert_judgement_condemns(
        &db,
        CLAIM_SQL,
        PARAMS,
        &[
            (
                "without_index",
                "DROP INDEX outbox.events_pending_due",
                &["index", "pages"][..],
            ),
            (
                "seq_scan",
                "SET LOCAL enable_seqscan = on; SET LOCAL enable_indexscan = off",
                &["index", "filter", "pages"][..],
            ),
        ],
        faults,
    )
    .await;

    // Then the kept plan, on the grown table.
    let explained = explain(&claimer, "kept", PARAMS).await;
    let plan = &explained[0]["Plan"];
    assert_eq!(plan["Actual Rows"], 1, "the due event is claimed: {plan:#}");
    let found = faults(&explained);
    assert!(found.is_empty(), "{found:#?}");
    let state: String = admin
        .query_one(
            "SELECT state FROM outbox.events WHERE payload->>'paymentNumber' = 'due'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "leased");
}

// The fair claim (claim_fair.sql), judged the same way: it runs with a
// plan made per run, but is written so that even a plan made once on an
// empty table reads no more than it must (issue 26); and its walk goes
// only as far as it needs.

const CLAIM_FAIR_SQL: &str = include_str!("../../sql/queries/claim_fair.sql");

/// The fair claim of one event, its walk from the first endpoint.
const FAIR_PARAMS: &str = "(1, 'a', 60000, 8, '{}', '{}', '{}', 0, '', '{}', '{}', 32, 16)";

/// Rows of outbox.events the claim of one event may read, every scan of
/// the table counted: the walk's step per endpoint it passes (here two,
/// the first of them paused), the claimed row from its endpoint's head, its
/// update, with room to spare (measured: 5).
/// Without the index, or reading the table, it is thousands.
const MAX_ROWS_READ: f64 = 20.0;

/// What is wrong with a fair claim's `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`,
/// each fault tagged with what it is about: `index` (the endpoints with
/// something due are not found through `events_endpoint_pending`),
/// `filter` (rows of outbox.events read and thrown away), `rows` (the
/// scans of outbox.events returned more than [`MAX_ROWS_READ`] rows in all).
fn fair_faults(explained: &Value) -> Vec<(&'static str, String)> {
    let mut all = Vec::new();
    nodes(&explained[0]["Plan"], &mut all);
    let mut faults = Vec::new();
    if !all
        .iter()
        .any(|n| n["Relation Name"] == "events" && n["Index Name"] == "events_endpoint_pending")
    {
        faults.push((
            "index",
            "outbox.events is not read through events_endpoint_pending".into(),
        ));
    }
    let mut read = 0.0;
    for node in all.iter().filter(|n| n["Relation Name"] == "events") {
        let thrown =
            number(node, "Rows Removed by Filter") + number(node, "Rows Removed by Index Recheck");
        if thrown > 0.0 {
            faults.push((
                "filter",
                format!("{thrown} rows read and thrown away: {node:#}"),
            ));
        }
        read += number(node, "Actual Rows") * number(node, "Actual Loops");
    }
    if read > MAX_ROWS_READ {
        faults.push((
            "rows",
            format!("{read} rows of outbox.events read to claim one"),
        ));
    }
    faults
}

#[tokio::test]
async fn the_fair_claims_plan_made_on_an_empty_table_reads_only_what_it_must() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    // The plan is made here, on empty tables that ANALYZE saw empty.
    let claimer = plan_kept_on_empty_tables(&db, CLAIM_FAIR_SQL, FAIR_PARAMS).await;

    // Then the outbox fills, all of it enqueued before the one due event
    // and lying in front of it in the table: 6,000 events of 20 companies,
    // delivered or failed, in flight on another instance, or with a retry
    // set an hour away (`scheduled`); and 500 due events of a company that
    // paused its endpoint, older than the due one and before it in the
    // walk's order. Written in those states
    // rather than walked there, so the indexes hold no entries of rows that
    // left them: until a vacuum those are walked by every plan, this one
    // included, and would hide what the plan itself reads.
    admin
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'http://127.0.0.1:9/hooks' FROM generate_series(1, 21) c;
             INSERT INTO outbox.events
                    (company_id, payload, state, next_attempt_at, delivered_at, lease_owner)
             SELECT 1 + g % 20,
                    jsonb_build_object('companyId', 1 + g % 20, 'paymentId', g, 'paymentNumber', g::text),
                    s.state,
                    CASE s.state WHEN 'scheduled' THEN now() + interval '1 hour'
                                 WHEN 'leased' THEN now() + interval '1 minute'
                                 ELSE now() - interval '1 hour' END,
                    CASE s.state WHEN 'delivered' THEN now() END,
                    CASE s.state WHEN 'leased' THEN 'another-instance' END
               FROM generate_series(1, 6000) g,
                    LATERAL (SELECT CASE WHEN g % 10 = 0 THEN 'failed'
                                         WHEN g % 10 = 1 THEN 'leased'
                                         WHEN g % 10 < 6 THEN 'scheduled'
                                         ELSE 'delivered' END AS state) AS s;
             SELECT outbox.pause_endpoint(1);
             INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT 1, jsonb_build_object('companyId', 1, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '1 hour'
               FROM generate_series(1, 500) g;
             SELECT outbox.enqueue_payment_cancellation(7, 99999, 'due');",
        )
        .await
        .unwrap();

    // First, that the judgement can fail: the same claim, planned without
    // the ordered walk, in transactions that are rolled back (so the due
    // event stays due, and the kept plan above is not touched: a rolled
    // back DROP INDEX invalidates no other session's plans). Without the
    // index, or with index scans off, the planner reads the table.
    assert_judgement_condemns(
        &db,
        CLAIM_FAIR_SQL,
        FAIR_PARAMS,
        &[
            (
                "without_index",
                "DROP INDEX outbox.events_endpoint_pending",
                &["index", "rows"][..],
            ),
            (
                "seq_scan",
                "SET LOCAL enable_seqscan = on; SET LOCAL enable_indexscan = off",
                &["index", "filter", "rows"][..],
            ),
        ],
        fair_faults,
    )
    .await;

    // Then the kept plan, on the grown table.
    let explained = explain(&claimer, "kept", FAIR_PARAMS).await;
    let plan = &explained[0]["Plan"];
    // The due event, a `more` note (it got its share of a batch of one)
    // and a `cursor` note (where the walk stopped).
    assert_eq!(plan["Actual Rows"], 3, "the due event is claimed: {plan:#}");
    let found = fair_faults(&explained);
    assert!(found.is_empty(), "{found:#?}");
    let state: String = admin
        .query_one(
            "SELECT state FROM outbox.events WHERE payload->>'paymentNumber' = 'due'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "leased");
}

/// Issue 26: a fair claim whose cost does not grow with the endpoints that
/// have something due. 1,000 companies with two due events each, and in
/// front of them in the walk's order a paused company with 500: a claim of
/// 64 reads about one endpoint per event, where the fair claim before
/// (which walked every endpoint with something due) read 1,194 rows.
/// Successive claims go on where the last stopped, so every company is
/// served once before any is served twice.
#[tokio::test]
async fn the_fair_claim_walks_only_the_endpoints_it_needs_and_goes_on_where_it_stopped() {
    use outboxd::store::claim;
    use std::collections::HashSet;

    let db = TestDb::new().await;
    let admin = db.client().await;
    admin
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'http://127.0.0.1:9/hooks' FROM generate_series(1, 1001) c;
             SELECT outbox.pause_endpoint(1);
             INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT c, jsonb_build_object('companyId', c, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '1 hour' + g * interval '1 millisecond'
               FROM generate_series(2, 1001) c, generate_series(1, 2) g;
             INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT 1, jsonb_build_object('companyId', 1, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '2 hours'
               FROM generate_series(1, 500) g;",
        )
        .await
        .unwrap();
    admin
        .batch_execute("VACUUM ANALYZE outbox.events")
        .await
        .unwrap();

    // What one claim of 64 reads, rolled back.
    let pool = db.pool();
    let claimer = pool.get().await.unwrap();
    claimer
        .batch_execute(&format!("PREPARE kept AS {CLAIM_FAIR_SQL}"))
        .await
        .unwrap();
    claimer.batch_execute("BEGIN").await.unwrap();
    let explained = explain(
        &claimer,
        "kept",
        "(64, 'a', 60000, 8, '{}', '{}', '{}', 0, '', '{}', '{}', 2147483647, 16)",
    )
    .await;
    claimer.batch_execute("ROLLBACK").await.unwrap();
    let mut all = Vec::new();
    nodes(&explained[0]["Plan"], &mut all);
    let read: f64 = all
        .iter()
        .filter(|n| n["Relation Name"] == "events")
        .map(|n| number(n, "Actual Rows") * number(n, "Actual Loops"))
        .sum();
    // Measured: 257, about four per event (the walk's 65 steps, the paused
    // company and then 64; the rows claimed, each from its endpoint's
    // head; their update, by id). Walking every endpoint: 1,194.
    assert!(
        read <= 5.0 * 64.0,
        "{read} rows of outbox.events read to claim 64"
    );
    drop(claimer);

    // Fair claims in a row, as the claim loop makes them.
    let pooled = db.pool().get().await.unwrap();
    let mut cursor = claim::Cursor::default();
    let mut claims: Vec<HashSet<i64>> = Vec::new();
    for _ in 0..16 {
        let claimed = crate::harness::claim_with(
            &pooled,
            claim::Mode::Fair(&cursor),
            64,
            &claim::InFlight::default(),
        )
        .await;
        assert_eq!(claimed.events.len(), 64, "a full batch each time");
        assert!(claimed.events.iter().all(|e| !e.probe));
        claims.push(claimed.events.iter().map(|e| e.company_id).collect());
        cursor = claimed.cursor.expect("a cursor after a full batch");
    }
    // One event of each of 64 companies a claim, in the walk's order from
    // company 2 (the paused one is never claimed); the 16th claim reaches
    // the last company and wraps round to the first ones again.
    for (i, companies) in claims[..15].iter().enumerate() {
        let from = 2 + 64 * i as i64;
        assert_eq!(*companies, (from..from + 64).collect(), "claim {i}");
    }
    assert_eq!(claims[15], (962..=1001).chain(2..=25).collect());
    assert_eq!(cursor.company_id, 25);
}

/// Issue 26: the plain claim locks and leaves the rows of an endpoint it
/// did not know was held or full, and says which, with its due rows
/// counted (up to a bound); told to step over those endpoints, it passes their rows in its
/// walk before locking them (the plan's index scan throws them away below
/// the row locks) and leases a whole batch from behind them. A circuit
/// waiting for its probe hands over to the fair claim, which alone sends
/// probes, for one claim whose walk starts at that endpoint.
#[tokio::test]
async fn the_plain_claim_steps_over_held_and_full_endpoints_without_locking_their_rows() {
    use outboxd::store::claim;

    let db = TestDb::new().await;
    let admin = db.client().await;
    // Company 1 paused with 30 due rows at the head, company 2 with 10 due
    // rows and 8 in flight (its cap), 100 companies with one due row each.
    admin
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'http://127.0.0.1:9/hooks' FROM generate_series(1, 102) c;
             SELECT outbox.pause_endpoint(1);
             INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT 1 + g % 2, jsonb_build_object('companyId', 1 + g % 2, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '2 hours' + g * interval '1 second'
               FROM generate_series(1, 20) g;
             INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT 1, jsonb_build_object('companyId', 1, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '90 minutes' + g * interval '1 second'
               FROM generate_series(21, 40) g;
             INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT 2 + g, jsonb_build_object('companyId', 2 + g, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '1 hour' + g * interval '1 second'
               FROM generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    let pool = db.claim_pool();
    let claimer = pool.get().await.unwrap();
    let two_full = claim::InFlight {
        company_ids: vec![2],
        event_types: vec!["payment.cancellation".into()],
        counts: vec![8],
        ..Default::default()
    };
    let nothing = claim::Skip::default();

    // Not told of them: the 40 rows of companies 1 and 2 are locked and
    // left, 8 others claimed, and both endpoints come back as steps.
    let first =
        crate::harness::claim_with(&claimer, claim::Mode::Plain(&nothing), 48, &two_full).await;
    assert_eq!(first.events.len(), 8);
    assert!(first.events.iter().all(|e| e.company_id > 2));
    // Counted as the loop counts them, on a connection of the other pool.
    let pooled = db.pool().get().await.unwrap();
    let mut steps = first.steps.clone();
    claim::count_steps(&pooled, &mut steps).await.unwrap();
    steps.sort_by_key(|s| s.key.0);
    assert_eq!(
        steps,
        [
            claim::Step {
                key: (1, "payment.cancellation".into()),
                held: true,
                due: 30,
                destination: None,
            },
            claim::Step {
                key: (2, "payment.cancellation".into()),
                held: false,
                due: 10,
                destination: None,
            },
        ]
    );
    assert!(first.capped.contains(&(2, "payment.cancellation".into())));
    assert!(
        first.probe.is_none(),
        "a paused endpoint waits for no probe"
    );
    assert!(first.more, "the window was full: more may be due behind it");

    // Told of them: a whole batch from behind their 40 rows, which the
    // walk threw away before the row locks (the plan's scan of
    // events_pending_due under the LockRows node of `due`).
    let told = claim::Skip::of(&[
        (1, "payment.cancellation".to_owned()),
        (2, "payment.cancellation".to_owned()),
    ]);
    // (On the daemon's claim connection, so planned as the daemon plans
    // it: generic, no sequential or bitmap scans.)
    claimer
        .batch_execute(&format!("BEGIN; PREPARE told AS {CLAIM_SQL}"))
        .await
        .unwrap();
    let explained = explain(
        &claimer,
        "told",
        "(48, 'a', 60000, 8, '{2}', '{payment.cancellation}', '{8}', \
         '{1,2}', '{payment.cancellation,payment.cancellation}', '{}', '{}', 2147483647, 16)",
    )
    .await;
    claimer.batch_execute("ROLLBACK").await.unwrap();
    let mut all = Vec::new();
    nodes(&explained[0]["Plan"], &mut all);
    let locked = all
        .iter()
        .find(|n| {
            n["Node Type"] == "LockRows" && n["Plans"][0]["Index Name"] == "events_pending_due"
        })
        .unwrap_or_else(|| {
            panic!("the walk of events_pending_due under its row locks: {explained:#}")
        });
    assert_eq!(number(locked, "Actual Rows"), 48.0, "{locked:#}");
    assert_eq!(
        number(&locked["Plans"][0], "Rows Removed by Filter"),
        40.0,
        "the 40 rows passed over in the walk, not locked: {locked:#}"
    );
    let second =
        crate::harness::claim_with(&claimer, claim::Mode::Plain(&told), 48, &two_full).await;
    assert_eq!(second.events.len(), 48);
    assert!(second.events.iter().all(|e| e.company_id > 2));
    assert!(second.steps.is_empty() && second.probe.is_none());

    // A due count stops at the bound on held rows stepped over: 5,000 more
    // rows of company 1 (5,030 due) are reported as 5,001.
    admin
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT 1, jsonb_build_object('companyId', 1, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '3 hours'
               FROM generate_series(100, 5099) g;",
        )
        .await
        .unwrap();
    let mut third =
        crate::harness::claim_with(&claimer, claim::Mode::Plain(&nothing), 4, &two_full).await;
    assert!(third.events.is_empty());
    assert_eq!(third.steps.len(), 1);
    claim::count_steps(&pooled, &mut third.steps).await.unwrap();
    assert_eq!(third.steps[0].due, claim::STEP_HELD_ROWS as u32 + 1);

    // One row of an endpoint whose circuit's cool-down is over, among
    // rows free to send: only the fair claim probes, so it hands over,
    // with the cursor just before that endpoint: the same company's other
    // endpoint, which sorts before it and has a row due.
    admin
        .batch_execute(
            "SELECT outbox.resume_endpoint(1);
             DELETE FROM outbox.events WHERE company_id IN (1, 2);
             INSERT INTO outbox.endpoint_circuits
                    (company_id, event_type, state, failures, opened_at, retry_at, cooldown_ms)
             VALUES (90, 'payment.cancellation', 'open', 5, now() - interval '1 minute',
                     now() - interval '1 second', 30000);
             UPDATE outbox.events SET state = 'pending', next_attempt_at = now() - interval '3 hours'
              WHERE company_id = 90;
             UPDATE outbox.events SET state = 'pending', next_attempt_at = now() - interval '1 hour'
              WHERE company_id BETWEEN 91 AND 97;
             INSERT INTO outbox.endpoints (company_id, event_type, url)
             VALUES (90, 'invoice.created', 'http://127.0.0.1:9/hooks');
             INSERT INTO outbox.events (company_id, event_type, payload, next_attempt_at)
             VALUES (90, 'invoice.created', '{\"invoiceId\": 1}', now() - interval '30 minutes');",
        )
        .await
        .unwrap();
    let fourth =
        crate::harness::claim_with(&claimer, claim::Mode::Plain(&nothing), 8, &two_full).await;
    assert_eq!(fourth.events.len(), 7);
    assert!(fourth.events.iter().all(|e| e.company_id != 90));
    let at = fourth
        .probe
        .expect("a circuit waiting for its probe hands over");
    assert_eq!(
        at,
        claim::Cursor {
            company_id: 90,
            event_type: "invoice.created".into()
        }
    );
    // The fair claim of one from there begins with it, and probes it.
    let probed = crate::harness::claim_with(
        &pooled,
        claim::Mode::Fair(&at),
        1,
        &claim::InFlight::default(),
    )
    .await;
    assert_eq!(probed.events.len(), 1);
    let sent = &probed.events[0];
    assert_eq!(
        (sent.company_id, sent.event_type.as_str(), sent.probe),
        (90, "payment.cancellation", true)
    );
}

/// Issue 26: the fair claim's walk counts only endpoints that can take
/// something, and says when it stopped at its bound. Endpoints whose own
/// `max_in_flight` (1) is in flight on this instance are passed, not
/// counted, so a claim of 2 reaches the endpoints behind them instead of
/// coming back empty with `more` (which would have the loop claim again at
/// once for as long as those deliveries last); and behind 1,200 paused
/// endpoints the walk stops at 1,000 with a `far` note, and the next claim
/// goes on from there to the endpoint that can send.
#[tokio::test]
async fn the_fair_claim_passes_full_and_held_endpoints_without_coming_back_empty_for_nothing() {
    use outboxd::store::claim;

    let db = TestDb::new().await;
    let admin = db.client().await;
    admin
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url, max_in_flight)
             SELECT c, 'http://127.0.0.1:9/hooks', CASE WHEN c <= 3 THEN 1 END
               FROM generate_series(1, 5) c;
             SELECT count(outbox.enqueue_payment_cancellation(c, c, 'P' || c))
               FROM generate_series(1, 5) c;",
        )
        .await
        .unwrap();
    let pooled = db.pool().get().await.unwrap();
    let fair = |limit, in_flight, after| {
        let pooled = &pooled;
        async move {
            crate::harness::claim_with(pooled, claim::Mode::Fair(after), limit, in_flight).await
        }
    };
    let full = claim::InFlight {
        company_ids: vec![1, 2, 3],
        event_types: vec!["payment.cancellation".into(); 3],
        counts: vec![1, 1, 1],
        ..Default::default()
    };
    let start = claim::Cursor::default();
    let first = fair(2, &full, &start).await;
    let mut got: Vec<i64> = first.events.iter().map(|e| e.company_id).collect();
    got.sort();
    assert_eq!(got, [4, 5], "the endpoints with room behind the full ones");

    // 1,200 paused endpoints in front of one that can send.
    admin
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'http://127.0.0.1:9/hooks' FROM generate_series(100, 1300) c;
             SELECT count(outbox.pause_endpoint(c)) FROM generate_series(100, 1299) c;
             SELECT count(outbox.enqueue_payment_cancellation(c, c, 'P' || c))
               FROM generate_series(100, 1300) c;",
        )
        .await
        .unwrap();
    let after_five = claim::Cursor {
        company_id: 5,
        event_type: "payment.cancellation".into(),
    };
    let none = claim::InFlight::default();
    let stopped = fair(1, &none, &after_five).await;
    assert!(stopped.events.is_empty());
    assert!(stopped.far, "the walk stopped at its bound: walk on");
    let cursor = stopped.cursor.expect("where the walk stopped");
    assert_eq!(
        cursor.company_id, 1099,
        "1,000 endpoints walked from company 100"
    );
    let reached = fair(1, &none, &cursor).await;
    assert_eq!(
        reached
            .events
            .iter()
            .map(|e| e.company_id)
            .collect::<Vec<_>>(),
        [1300]
    );
    assert!(!reached.far);
}
