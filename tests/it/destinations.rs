//! The cap per destination (an endpoint's host and port, across companies
//! and event types) and the ceiling on an endpoint's own max_in_flight
//! (issue 25, point 3). Real PostgreSQL, real daemons, real receivers on
//! 127.0.0.1, where another port is another destination.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outboxd::store::claim::{self, Caps, Cursor, InFlight, Mode, Skip};

use crate::harness::{Daemon, TestDb};
use crate::receiver::{Receiver, Reply};
use crate::tenants::{endpoint, enqueue, max_in_flight, ok};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

/// One claim of up to 64, with these caps and what is in flight.
async fn claim(db: &TestDb, mode: Mode<'_>, caps: Caps, in_flight: &InFlight) -> claim::Claim {
    let client = db.pool().get().await.unwrap();
    claim::claim(&client, mode, 64, "test", SECS(60), caps, in_flight)
        .await
        .unwrap()
}

/// Each case: an endpoint's url and the destination both claims return for
/// its event (`outbox.endpoints.destination`, migration 0014).
const URLS: &[(&str, &str)] = &[
    ("https://Hooks.Example.COM/a", "hooks.example.com:443"),
    ("https://hooks.example.com:443/b", "hooks.example.com:443"),
    ("http://hooks.example.com/c", "hooks.example.com:80"),
    ("http://hooks.example.com:80", "hooks.example.com:80"),
    ("HTTP://hooks.example.com:8080", "hooks.example.com:8080"),
    ("https://hooks.example.com?x=1", "hooks.example.com:443"),
    ("https://hooks.example.com#top", "hooks.example.com:443"),
    ("http://127.0.0.1:9/x?y=1", "127.0.0.1:9"),
    ("http://[::1]/z", "[::1]:80"),
    ("https://[::1]:8443/z", "[::1]:8443"),
];

#[tokio::test]
async fn the_destination_is_the_urls_host_and_port_in_both_claims() {
    let skip = Skip::default();
    let start = Cursor::default();
    for mode in [Mode::Plain(&skip), Mode::Fair(&start)] {
        let db = TestDb::new().await;
        let client = db.client().await;
        for (i, (url, _)) in URLS.iter().enumerate() {
            endpoint(&client, i as i64 + 1, url, None).await;
            enqueue(&client, i as i64 + 1, 1).await;
        }
        // And an event without an endpoint: no destination.
        enqueue(&client, 100, 1).await;
        let claimed = claim(&db, mode, Caps::SHIPPED, &InFlight::default()).await;
        assert_eq!(claimed.events.len(), URLS.len() + 1, "{mode:?}");
        for event in &claimed.events {
            let expected = URLS
                .get(event.company_id as usize - 1)
                .map(|(_, destination)| destination.to_string());
            assert_eq!(
                event.destination, expected,
                "{mode:?}, company {}",
                event.company_id
            );
        }
    }
}

#[tokio::test]
async fn a_claim_takes_no_more_per_destination_than_its_room_and_probes_none_past_it() {
    let caps = Caps {
        endpoint: 8,
        endpoint_ceiling: 16,
        destination: 4,
    };
    let skip = Skip::default();
    let start = Cursor::default();
    for mode in [Mode::Plain(&skip), Mode::Fair(&start)] {
        let db = TestDb::new().await;
        let client = db.client().await;
        // Ten companies at one vendor (paths and case differ), three due
        // events each; one company elsewhere, and one at a quick vendor
        // (no limit of its own).
        for company in 1..=10 {
            let host = if company % 2 == 0 {
                "VENDOR.test"
            } else {
                "vendor.test"
            };
            endpoint(
                &client,
                company,
                &format!("https://{host}/c{company}"),
                None,
            )
            .await;
            enqueue(&client, company, 3).await;
        }
        endpoint(&client, 11, "http://elsewhere.test:8080/hooks", None).await;
        enqueue(&client, 11, 3).await;
        endpoint(&client, 13, "https://quick.test/hooks", None).await;
        enqueue(&client, 13, 6).await;
        // A dead vendor whose destination is full: its open circuit, due
        // for its probe, is left alone (no half-open circuit waiting a
        // lease for a probe that cannot go).
        endpoint(&client, 12, "https://dead.test/hooks", None).await;
        enqueue(&client, 12, 1).await;
        client
            .execute(
                "INSERT INTO outbox.endpoint_circuits (company_id, event_type, state, failures, opened_at, retry_at)
                 VALUES (12, 'payment.cancellation', 'open', 5, now() - interval '1 minute', now() - interval '1 second')",
                &[],
            )
            .await
            .unwrap();
        // The vendor has one place left of its 4, the dead one none; the
        // quick one, no limit (as `Room` has it after quick answers).
        let in_flight = InFlight {
            destinations: vec![
                "vendor.test:443".into(),
                "dead.test:443".into(),
                "quick.test:443".into(),
            ],
            destination_rooms: vec![1, 0, i32::MAX],
            destination_counts: vec![3, 4, 20],
            ..InFlight::default()
        };
        let claimed = claim(&db, mode, caps, &in_flight).await;
        let per_destination = |d: &str| {
            claimed
                .events
                .iter()
                .filter(|e| e.destination.as_deref() == Some(d))
                .count()
        };
        assert_eq!(per_destination("vendor.test:443"), 1, "{mode:?}");
        // Not listed: the cap per destination, here above what it has due.
        assert_eq!(per_destination("elsewhere.test:8080"), 3, "{mode:?}");
        assert_eq!(per_destination("quick.test:443"), 6, "{mode:?}");
        assert_eq!(claimed.events.len(), 10, "{mode:?}");
        // The vendor comes back capped: the loop claims for it when one of
        // its requests ends, and steps over its endpoints meanwhile.
        assert_eq!(
            claimed.capped_destinations,
            HashSet::from(["vendor.test:443".to_string()]),
            "{mode:?}"
        );
        if let Mode::Plain(_) = mode {
            let mut stepped: Vec<(i64, Option<String>)> = claimed
                .steps
                .iter()
                .filter(|s| !s.held)
                .map(|s| (s.key.0, s.destination.clone()))
                .collect();
            stepped.sort();
            // All ten: company 1 sent one and left two.
            assert_eq!(stepped.len(), 10, "{stepped:?}");
            assert!(
                stepped
                    .iter()
                    .all(|(_, d)| d.as_deref() == Some("vendor.test:443")),
                "{stepped:?}"
            );
            // Not capped as endpoints: their own room is untouched.
            assert!(claimed.capped.is_empty(), "{:?}", claimed.capped);
        }
        let state: String = client
            .query_one(
                "SELECT state FROM outbox.endpoint_circuits WHERE company_id = 12",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(state, "open", "{mode:?}");
    }
}

/// The fair claim's round robin goes past an endpoint whose destination
/// has no room: it does not stop its cursor before it, where every next
/// claim would begin again for as long as that destination stays full.
#[tokio::test]
async fn the_fair_claims_cursor_goes_past_an_endpoint_whose_destination_is_full() {
    let db = TestDb::new().await;
    let client = db.client().await;
    endpoint(&client, 1, "https://full.test/hooks", None).await;
    enqueue(&client, 1, 3).await;
    endpoint(&client, 2, "https://other.test/hooks", None).await;
    enqueue(&client, 2, 1).await;
    let in_flight = InFlight {
        destinations: vec!["full.test:443".into()],
        destination_rooms: vec![0],
        destination_counts: vec![32],
        ..InFlight::default()
    };
    let start = Cursor::default();
    let claimed = claim(&db, Mode::Fair(&start), Caps::SHIPPED, &in_flight).await;
    let companies: Vec<i64> = claimed.events.iter().map(|e| e.company_id).collect();
    assert_eq!(companies, [2]);
    assert_eq!(
        claimed.cursor,
        Some(Cursor {
            company_id: 2,
            event_type: "payment.cancellation".into()
        })
    );
    assert_eq!(
        claimed.capped_destinations,
        HashSet::from(["full.test:443".to_string()])
    );
}

/// Six companies at one vendor (each its own path) that answers after
/// `hold`, `events` queued each, and a daemon with 8 slots, a cap of 2 per
/// endpoint and of 4 per destination: at their cap the six would take 12
/// requests in flight, more than the slots.
async fn six_companies_at_one_vendor(
    db: &TestDb,
    hold: Duration,
    events: i64,
) -> (tokio_postgres::Client, Receiver, Daemon) {
    let client = db.client().await;
    let vendor = Receiver::start(move |_, _| Reply::Delayed(hold, Box::new(ok()))).await;
    for company in 1..=6 {
        endpoint(&client, company, &vendor.url(&format!("/c{company}")), None).await;
        enqueue(&client, company, events).await;
    }
    let daemon = Daemon::start(
        db,
        &[
            ("OUTBOXD_DELIVERY__CONCURRENCY", "8"),
            ("OUTBOXD_DELIVERY__ENDPOINT_CONCURRENCY", "2"),
            ("OUTBOXD_DELIVERY__DESTINATION_CONCURRENCY", "4"),
        ],
    )
    .await;
    (client, vendor, daemon)
}

/// Six companies at one vendor that answers in 4 s: the vendor is held to
/// its cap of 4, so another company's events flow.
#[tokio::test]
async fn many_companies_at_one_slow_destination_hold_its_cap_and_another_flows() {
    let db = TestDb::new().await;
    let hold = SECS(4);
    let (client, vendor, daemon) = six_companies_at_one_vendor(&db, hold, 4).await;
    let other = Receiver::ok().await;
    endpoint(&client, 7, &other.url("/hooks"), None).await;
    vendor.wait_for(4, SECS(10)).await;
    let enqueued = Instant::now();
    enqueue(&client, 7, 5).await;
    let arrived = other.wait_for(5, SECS(30)).await;
    let last = arrived.iter().map(|r| r.at).max().unwrap();
    assert!(
        last.duration_since(enqueued) < MS(1500),
        "company 7 waited {:?} behind the vendor",
        last.duration_since(enqueued)
    );
    // Two rounds of the vendor's answers: never more than 4 in flight to
    // it, from more than one company.
    let requests = vendor.wait_for(12, SECS(20)).await;
    assert_eq!(max_in_flight(&requests, hold), 4);
    let paths: HashSet<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    assert!(paths.len() >= 3, "{paths:?}");
    daemon.stop().await;
}

/// The same six companies at a vendor that answers in 150 ms, within the
/// quick bound: after its first quick answers it may use every slot, so
/// more than its cap of 4 are in flight at once.
#[tokio::test]
async fn a_destination_that_answers_quickly_is_not_held_to_the_cap() {
    let db = TestDb::new().await;
    let hold = MS(150);
    let (_client, vendor, daemon) = six_companies_at_one_vendor(&db, hold, 10).await;
    let requests = vendor.wait_for(60, SECS(30)).await;
    // The first claim, before any answer: the cap.
    let first: Vec<_> = requests
        .iter()
        .filter(|r| r.at.duration_since(requests[0].at) < MS(100))
        .collect();
    assert_eq!(first.len(), 4, "the first requests, held to the cap");
    let peak = max_in_flight(&requests, hold);
    assert!(peak > 4, "at most {peak} in flight at once");
    daemon.stop().await;
}

#[tokio::test]
async fn an_endpoints_max_in_flight_of_1000_is_cut_to_the_ceiling() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let hold = SECS(2);
    let slow = Receiver::start(move |_, _| Reply::Delayed(hold, Box::new(ok()))).await;
    endpoint(&client, 1, &slow.url("/hooks"), Some(1000)).await;
    enqueue(&client, 1, 9).await;
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_DELIVERY__ENDPOINT_CONCURRENCY", "2"),
            ("OUTBOXD_DELIVERY__MAX_IN_FLIGHT_CEILING", "3"),
        ],
    )
    .await;
    let all = slow.wait_for(9, SECS(20)).await;
    assert_eq!(max_in_flight(&all, hold), 3);
    daemon.stop().await;
}
