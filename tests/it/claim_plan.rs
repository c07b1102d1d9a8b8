//! The plain claim keeps one plan per connection (`db::claim_pool`), made
//! without its parameters from the statistics of the moment it first runs.
//! These tests make that plan on the worst statistics there are, an
//! analysed empty table, then run it on a table of thousands of rows and
//! read what it touched.

use serde_json::Value;

use crate::harness::TestDb;

const CLAIM_SQL: &str = include_str!("../../sql/queries/claim.sql");

/// Every plan node of an `EXPLAIN (ANALYZE, FORMAT JSON)` tree.
fn nodes<'a>(plan: &'a Value, out: &mut Vec<&'a Value>) {
    out.push(plan);
    for child in plan["Plans"].as_array().into_iter().flatten() {
        nodes(child, out);
    }
}

#[tokio::test]
async fn the_plain_claims_kept_plan_reads_only_the_rows_it_claims_however_the_table_grew() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    for table in ["events", "endpoints", "endpoint_circuits"] {
        admin
            .batch_execute(&format!("VACUUM ANALYZE outbox.{table}"))
            .await
            .unwrap();
    }
    let pool = db.claim_pool();
    let claimer = pool.get().await.unwrap();
    claimer
        .batch_execute(&format!("PREPARE plain AS {CLAIM_SQL}"))
        .await
        .unwrap();
    let run = "EXECUTE plain(1, 'a', 60000, 8, '{}', '{}', '{}')";
    // The plan is made here, on empty tables that ANALYZE saw empty.
    assert!(claimer.query(run, &[]).await.unwrap().is_empty());

    // Then the outbox fills: 3,000 events delivered (their rows and dead
    // versions stay, as between vacuums), one due.
    admin
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'http://127.0.0.1:9/hooks' FROM generate_series(1, 20) c;
             INSERT INTO outbox.events (company_id, payload)
             SELECT 1 + g % 20, jsonb_build_object('companyId', 1 + g % 20, 'paymentId', g, 'paymentNumber', g::text)
               FROM generate_series(1, 3000) g;
             UPDATE outbox.events SET state = 'delivered', delivered_at = now();
             SELECT outbox.enqueue_payment_cancellation(7, 99999, 'due');",
        )
        .await
        .unwrap();

    let explained: Value = claimer
        .query_one(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {run}"), &[])
        .await
        .unwrap()
        .get(0);
    let plan = &explained[0]["Plan"];
    assert_eq!(plan["Actual Rows"], 1, "the due event is claimed: {plan:#}");
    let mut all = Vec::new();
    nodes(plan, &mut all);
    for node in all {
        if node["Relation Name"] == "events" {
            let read =
                node["Actual Rows"].as_f64().unwrap() * node["Actual Loops"].as_f64().unwrap();
            assert!(
                read <= 1.0,
                "a scan of outbox.events read {read} rows to claim one: {node:#}"
            );
        }
    }
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
