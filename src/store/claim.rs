//! The claim: the one statement that leases a batch of due events to this
//! instance and returns each with its endpoint (`sql/queries/claim.sql`,
//! oldest first, or `claim_fair.sql`, endpoints in turn from where the last
//! fair claim stopped, while held rows crowd the head of the queue), and
//! the rows turned into [`ClaimedEvent`]s.

use std::collections::HashSet;
use std::time::Duration;

use uuid::Uuid;

use crate::model::{Auth, ClaimedEvent, Endpoint, EndpointKey, Secret};
use crate::store::error::{self, ErrorKind};
use crate::store::pool as db;
use crate::store::txn;
use crate::telemetry;

const CLAIM_SQL: &str = include_str!("../../sql/queries/claim.sql");
const CLAIM_FAIR_SQL: &str = include_str!("../../sql/queries/claim_fair.sql");
const STEP_COUNTS_SQL: &str = include_str!("../../sql/queries/step_counts.sql");
const HAND_BACK_SQL: &str = include_str!("../../sql/queries/hand_back.sql");
const HAND_BACK_UNKNOWN_SQL: &str = include_str!("../../sql/queries/hand_back_unknown.sql");

/// What is in flight, as the claim statements take it: per endpoint ($5,
/// $6, $7), and the room each destination has ($10, $11; one not listed
/// has the cap per destination, [`Caps::destination`]).
#[derive(Debug, Default)]
pub struct InFlight {
    pub company_ids: Vec<i64>,
    pub event_types: Vec<String>,
    pub counts: Vec<i32>,
    /// Destinations (`host:port`, as `outbox.endpoints.destination` has
    /// them), their room on this instance, and what is in flight to each.
    pub destinations: Vec<String>,
    pub destination_rooms: Vec<i32>,
    pub destination_counts: Vec<u32>,
}

/// The caps a claim keeps, per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Per endpoint, unless it sets its own max_in_flight ($4).
    pub endpoint: u32,
    /// The most an endpoint's own max_in_flight counts for ($13).
    pub endpoint_ceiling: u32,
    /// Per destination, across endpoints, unless it answers quickly ($12;
    /// `pipeline::producer::Room` gives each destination its room).
    pub destination: u32,
}

impl Caps {
    /// The shipped configuration's (`config.toml`), for tests and benches.
    pub const SHIPPED: Caps = Caps {
        endpoint: 8,
        endpoint_ceiling: 16,
        destination: 32,
    };

    /// The caps `delivery` configures.
    pub fn of(delivery: &crate::config::DeliveryConfig) -> Caps {
        Caps {
            endpoint: delivery.endpoint_concurrency,
            endpoint_ceiling: delivery.max_in_flight_ceiling,
            destination: delivery.destination_concurrency,
        }
    }
}

impl InFlight {
    /// What was in flight to `key` (0: nothing).
    pub fn count(&self, key: &EndpointKey) -> u32 {
        self.company_ids
            .iter()
            .zip(&self.event_types)
            .zip(&self.counts)
            .find(|((c, t), _)| **c == key.0 && **t == key.1)
            .map_or(0, |(_, n)| *n as u32)
    }

    /// What was in flight to `destination` (0: nothing).
    pub fn destination_count(&self, destination: &str) -> u32 {
        self.destinations
            .iter()
            .zip(&self.destination_counts)
            .find(|(d, _)| *d == destination)
            .map_or(0, |(_, n)| *n)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("claiming due events: {message}")]
pub struct ClaimError {
    pub message: String,
    /// What retrying can do about it ([`ErrorKind`]).
    pub kind: ErrorKind,
}

/// Which claim statement, with what it alone takes: the plain oldest-first
/// one, told which endpoints to step over, or the fair one, told where its
/// walk goes on (taken while rows of held endpoints crowd the head of the
/// queue in numbers too large to step over cheaply).
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    Plain(&'a Skip),
    Fair(&'a Cursor),
}

impl Mode<'_> {
    pub fn is_plain(&self) -> bool {
        matches!(self, Mode::Plain(_))
    }
}

/// The endpoints the plain claim passes over without locking their rows
/// (`sql/queries/claim.sql`, $8, $9): those the last claims found held or
/// at their cap on this instance.
#[derive(Debug, Default, Clone)]
pub struct Skip {
    pub company_ids: Vec<i64>,
    pub event_types: Vec<String>,
}

impl Skip {
    pub fn of<'k>(keys: impl IntoIterator<Item = &'k EndpointKey>) -> Skip {
        let mut skip = Skip::default();
        for (company_id, event_type) in keys {
            skip.company_ids.push(*company_id);
            skip.event_types.push(event_type.clone());
        }
        skip
    }
}

/// How many due rows of held endpoints (`sql/queries/claim.sql`, $10) and
/// of endpoints at their cap ($11) the plain claim steps over at most;
/// past these the fair claim is the cheaper one
/// (`pipeline::producer::Steps`). Held rows stay where they are, so the
/// plain claim steps over the same ones every time: a drain beside a
/// paused company with 4,500 of them at the head ran 1.3-1.7 times as fast
/// stepping over them as with the fair claim (docs/BENCHMARKS.md). Rows of
/// an endpoint at its cap are counted afresh each time a delivery to it
/// ends, so their bound is lower.
pub const STEP_HELD_ROWS: i32 = 5000;
pub const STEP_FULL_ROWS: i32 = 1000;

/// An endpoint whose rows the plain claim locked and left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub key: EndpointKey,
    /// Held (circuit not closed, or a Retry-After); else at its cap.
    pub held: bool,
    /// Its due rows, once [`count_steps`] has counted them; past its share
    /// of [`STEP_HELD_ROWS`] or [`STEP_FULL_ROWS`], that bound and one
    /// more.
    pub due: u32,
    /// Left because its destination had no room (not held, nor at its own
    /// cap): that destination.
    pub destination: Option<String>,
}

/// Where the next fair claim goes on walking the endpoints: after this one
/// (`sql/queries/claim_fair.sql`, step 7). The default is before every endpoint
/// (company ids are positive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub company_id: i64,
    pub event_type: String,
}

/// What one claim returned.
#[derive(Debug, Default)]
pub struct Claim {
    pub events: Vec<ClaimedEvent>,
    /// Endpoints left at their cap with more due.
    pub capped: HashSet<EndpointKey>,
    /// Destinations left at their cap (their room on this instance) with
    /// more due.
    pub capped_destinations: HashSet<String>,
    /// The plain claim: endpoints whose rows it locked and left, held or
    /// at their cap (those at their cap are in `capped` too).
    pub steps: Vec<Step>,
    /// Some endpoint got only its share of this batch and may have more
    /// due, or endpoints able to send lie beyond where the walk stopped, or
    /// retries came due: claim again at once, even if the batch was short.
    pub more: bool,
    /// The plain claim left a row of an endpoint whose circuit waits for
    /// its probe, which only the fair claim sends: the next claim is the
    /// fair one, from this cursor (the endpoint with pending rows just
    /// before that one), so that its walk begins with it.
    pub probe: Option<Cursor>,
    /// The fair claim's walk stopped at its bound of endpoints without
    /// filling the batch (held endpoints, mostly): walk on at once.
    pub far: bool,
    /// Where the next fair claim goes on (None: where this one began).
    pub cursor: Option<Cursor>,
}

/// Leases up to `limit` due events to `owner` for `lease`, with `mode`'s
/// statement (the plain one steps over the endpoints it is given, the fair
/// one walks the endpoints from the one after the cursor it is given),
/// at most `caps.endpoint` in flight per endpoint on this instance
/// (counting `in_flight`) unless the endpoint sets its own (counted up to
/// `caps.endpoint_ceiling`), and each destination within the room
/// `in_flight` gives it (`caps.destination` if none). Each statement is
/// prepared once per pooled connection: one round trip per claim, not two.
#[allow(clippy::too_many_arguments)]
pub async fn claim(
    client: &deadpool_postgres::Client,
    mode: Mode<'_>,
    limit: usize,
    owner: &str,
    lease: Duration,
    caps: Caps,
    in_flight: &InFlight,
) -> Result<Claim, ClaimError> {
    let limit = limit as i64;
    let lease_ms = lease.as_millis() as i64;
    let cap = caps.endpoint as i32;
    let ceiling = caps.endpoint_ceiling as i32;
    let destination_cap = caps.destination as i32;
    let describe = |e: tokio_postgres::Error| ClaimError {
        message: db::describe(&e),
        kind: error::kind(&e),
    };
    let sql = match mode {
        Mode::Plain(_) => CLAIM_SQL,
        Mode::Fair(_) => CLAIM_FAIR_SQL,
    };
    let statement = client.prepare_cached(sql).await.map_err(describe)?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
        &limit,
        &owner,
        &lease_ms,
        &cap,
        &in_flight.company_ids,
        &in_flight.event_types,
        &in_flight.counts,
    ];
    match mode {
        Mode::Plain(skip) => params.extend([
            &skip.company_ids as &(dyn tokio_postgres::types::ToSql + Sync),
            &skip.event_types,
        ]),
        Mode::Fair(after) => params.extend([
            &after.company_id as &(dyn tokio_postgres::types::ToSql + Sync),
            &after.event_type,
        ]),
    }
    params.extend([
        &in_flight.destinations as &(dyn tokio_postgres::types::ToSql + Sync),
        &in_flight.destination_rooms,
        &destination_cap,
        &ceiling,
    ]);
    // Committed before anything is done with the rows (store::txn): an
    // error here leaves the leases unknown, and nothing of them is sent.
    let rows = txn::query_committed(client, &statement, &params)
        .await
        .map_err(describe)?;
    let mut claim = Claim::default();
    for row in &rows {
        match row.get::<_, Option<&str>>("note") {
            None => claim.events.push(from_row(row)),
            Some("worn_out") => {
                let id: Uuid = row.get("id");
                let attempts: i32 = row.get("attempts");
                tracing::warn!(
                    event_id = %id,
                    attempts,
                    "event failed unsent: its attempts are at the schema's limit (a row written by hand?)"
                );
                telemetry::completed(row.get("event_type"), "failed");
            }
            Some("capped") => match row.get::<_, Option<String>>("destination") {
                None => {
                    claim
                        .capped
                        .insert((row.get("company_id"), row.get("event_type")));
                }
                Some(destination) => {
                    claim.capped_destinations.insert(destination);
                }
            },
            Some(note @ ("step_held" | "step_full")) => {
                let key: EndpointKey = (row.get("company_id"), row.get("event_type"));
                let held = note == "step_held";
                let destination: Option<String> = row.get("destination");
                match &destination {
                    _ if held => {}
                    None => {
                        claim.capped.insert(key.clone());
                    }
                    Some(destination) => {
                        claim.capped_destinations.insert(destination.clone());
                    }
                }
                claim.steps.push(Step {
                    key,
                    held,
                    due: 0,
                    destination,
                });
            }
            Some("more") => claim.more = true,
            Some("probe") => {
                claim.probe = Some(Cursor {
                    company_id: row.get("company_id"),
                    event_type: row.get("event_type"),
                });
            }
            Some("far") => claim.far = true,
            Some("cursor") => {
                claim.cursor = Some(Cursor {
                    company_id: row.get("company_id"),
                    event_type: row.get("event_type"),
                });
            }
            Some(other) => tracing::debug!(note = other, "unknown claim note"),
        }
    }
    Ok(claim)
}

/// Counts the due rows of the endpoints a plain claim locked and left
/// (`sql/queries/step_counts.sql`), each up to its share of the bound for
/// its kind (held or full: the bound over the number of such endpoints),
/// so that a claim that left many endpoints reads about the bound in all.
/// One past its share is reported as the whole bound and one more. Run on
/// a pooled connection whose plans are made afresh: not the plain claim's.
pub async fn count_steps(
    client: &deadpool_postgres::Client,
    steps: &mut [Step],
) -> Result<(), tokio_postgres::Error> {
    let bound = |held: bool| if held { STEP_HELD_ROWS } else { STEP_FULL_ROWS };
    let share = |held: bool| {
        let n = steps.iter().filter(|s| s.held == held).count().max(1) as i32;
        (bound(held) / n).max(1)
    };
    let (held_share, full_share) = (share(true), share(false));
    let share_of = |held: bool| if held { held_share } else { full_share };
    let company_ids: Vec<i64> = steps.iter().map(|s| s.key.0).collect();
    let event_types: Vec<&str> = steps.iter().map(|s| s.key.1.as_str()).collect();
    let up_to: Vec<i32> = steps.iter().map(|s| share_of(s.held) + 1).collect();
    let statement = client.prepare_cached(STEP_COUNTS_SQL).await?;
    let rows = client
        .query(&statement, &[&company_ids, &event_types, &up_to])
        .await?;
    for (step, row) in steps.iter_mut().zip(&rows) {
        let pending = row.get::<_, i32>("pending").max(0);
        step.due = if pending > share_of(step.held) {
            bound(step.held) as u32 + 1
        } else {
            pending as u32
        };
    }
    Ok(())
}

/// Puts every event still leased to `owner` back in the queue, due at once
/// (`sql/queries/hand_back.sql`): the last step of a stop, once nothing of
/// this instance delivers any more. How many.
pub async fn hand_back(
    client: &tokio_postgres::Client,
    owner: &str,
) -> Result<i64, tokio_postgres::Error> {
    let row = client.query_one(HAND_BACK_SQL, &[&owner]).await?;
    Ok(row.get("handed_back"))
}

/// Puts back in the queue, due at once, every event leased to `owner` that
/// is not in `known` (an id at its claimed attempt: a delivery in flight
/// or an outcome not written yet): the leases of a claim whose result was
/// not known (`sql/queries/hand_back_unknown.sql`). How many.
pub async fn hand_back_unknown(
    client: &tokio_postgres::Client,
    owner: &str,
    known: &[(Uuid, i32)],
) -> Result<i64, tokio_postgres::Error> {
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = known.iter().copied().unzip();
    let row = client
        .query_one(HAND_BACK_UNKNOWN_SQL, &[&owner, &ids, &attempts])
        .await?;
    Ok(row.get("handed_back"))
}

fn from_row(row: &tokio_postgres::Row) -> ClaimedEvent {
    let url: Option<String> = row.get("url");
    let endpoint = url.map(|url| Endpoint {
        url,
        auth: auth_from(
            row.get("auth_type"),
            row.get("username"),
            row.get("password"),
            row.get("token"),
        ),
        enabled: row.get("enabled"),
        signing_secrets: secrets_from(row.get("signing_secrets")),
    });
    let age_ms: i64 = row.get("age_ms");
    ClaimedEvent {
        id: row.get("id"),
        event_type: row.get("event_type"),
        company_id: row.get("company_id"),
        payload: row.get("payload"),
        attempt: row.get("attempts"),
        budget_attempt: row.get("attempts_since_replay"),
        age: Duration::from_millis(age_ms.max(0) as u64),
        lease_expired: row.get("lease_expired"),
        probe: row.get("probe"),
        due_at: row.get("due_at"),
        circuit_dirty: row.get("circuit_dirty"),
        destination: row.get("destination"),
        endpoint,
    }
}

/// An endpoint's signing secrets as the statements return them.
pub(crate) fn secrets_from(secrets: Option<Vec<String>>) -> Vec<Secret> {
    secrets
        .unwrap_or_default()
        .into_iter()
        .map(Secret::new)
        .collect()
}

/// The schema guarantees basic has both secrets and bearer a token (checked
/// on write), so missing pieces only appear if someone bypassed it; they then
/// become empty credentials that the receiver refuses, recorded as such.
pub(crate) fn auth_from(
    auth_type: String,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
) -> Auth {
    match auth_type.as_str() {
        "basic" => Auth::Basic {
            username: username.unwrap_or_default(),
            password: Secret::new(password.unwrap_or_default()),
        },
        "bearer" => Auth::Bearer {
            token: Secret::new(token.unwrap_or_default()),
        },
        _ => Auth::None,
    }
}
