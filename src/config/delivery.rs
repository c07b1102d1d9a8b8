//! `[delivery]`: how many deliveries at once, their deadlines and leases,
//! and which receivers may be reached.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::tls::read_pem;
use super::values::{Problem, duration, in_range, problem};

const DEFAULT_CONCURRENCY: u32 = 64;
/// Per endpoint and instance: an eighth of one instance's slots, so a
/// slow tenant leaves the rest to the others (README, "Many tenants").
const DEFAULT_ENDPOINT_CONCURRENCY: u32 = 8;
/// Per destination (host and port) and instance, across companies and
/// event types: half of one instance's slots, so a vendor's SaaS that many
/// companies point at, slow, hung or down, leaves the other half to
/// everyone else. A destination that answers quickly is not held to it
/// (`pipeline::producer::Destination`; README, "Many tenants").
const DEFAULT_DESTINATION_CONCURRENCY: u32 = 32;
/// The most an endpoint's own `max_in_flight` (which the settings screen
/// writes, up to 1,000) is taken at: twice the default cap, a quarter of
/// one instance's slots.
const DEFAULT_MAX_IN_FLIGHT_CEILING: u32 = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Deliveries in flight at once, per instance.
    pub concurrency: usize,
    /// Deliveries in flight to one endpoint at once from this instance (an
    /// endpoint's `max_in_flight` overrides it).
    pub endpoint_concurrency: u32,
    /// The most an endpoint's own `max_in_flight` counts for: a higher one
    /// is cut to this.
    pub max_in_flight_ceiling: u32,
    /// Deliveries in flight to one destination (the url's host and port)
    /// at once from this instance, whatever the companies and event types.
    pub destination_concurrency: u32,
    /// Longest wait between two looks for due events when no NOTIFY comes.
    pub poll_interval: Duration,
    /// TCP connect to the receiver.
    pub connect_timeout: Duration,
    /// One whole attempt: connect, TLS, request, response head and body.
    pub request_timeout: Duration,
    /// How long a claimed event stays reserved for this instance.
    pub lease: Duration,
    /// Response bodies are read up to this many bytes; the rest is dropped.
    pub max_response_bytes: usize,
    /// On SIGTERM, how long in-flight deliveries may take to finish.
    pub drain_timeout: Duration,
    /// Special-purpose ranges (loopback, private, …) that endpoints may
    /// reach all the same.
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// Refuse plain http:// endpoints.
    pub require_https: bool,
    /// Extra root certificates (PEM) trusted for https endpoints, on top of
    /// the system's: for receivers with a private CA or a self-signed
    /// certificate.
    pub tls_ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    pub concurrency: Option<u32>,
    pub poll_interval: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub lease: Option<String>,
    pub max_response_bytes: Option<u64>,
    pub drain_timeout: Option<String>,
    pub allowed_networks: Option<Vec<String>>,
    pub require_https: Option<bool>,
    pub tls_ca_file: Option<PathBuf>,
    pub endpoint_concurrency: Option<u32>,
    pub max_in_flight_ceiling: Option<u32>,
    pub destination_concurrency: Option<u32>,
}

impl RawDelivery {
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<DeliveryConfig> {
        let concurrency = in_range(
            problems,
            "delivery.concurrency",
            self.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
            1,
            10_000,
        );
        let poll_interval = duration(
            problems,
            "delivery.poll_interval",
            self.poll_interval.as_deref(),
            "1s",
        );
        let connect_timeout = duration(
            problems,
            "delivery.connect_timeout",
            self.connect_timeout.as_deref(),
            "5s",
        );
        let request_timeout = duration(
            problems,
            "delivery.request_timeout",
            self.request_timeout.as_deref(),
            "10s",
        );
        let lease = duration(problems, "delivery.lease", self.lease.as_deref(), "60s");
        let max_response_bytes = in_range(
            problems,
            "delivery.max_response_bytes",
            self.max_response_bytes.unwrap_or(64 * 1024),
            1024,
            16 * 1024 * 1024,
        );
        let drain_timeout = duration(
            problems,
            "delivery.drain_timeout",
            self.drain_timeout.as_deref(),
            "20s",
        );
        if let (Some(lease), Some(request_timeout)) = (lease, request_timeout) {
            let least = min_lease(request_timeout);
            if lease < least {
                problem(
                    problems,
                    "delivery.lease",
                    format!(
                        "must be at least 2 x delivery.request_timeout + 10s ({}), so that a slow \
                         delivery is recorded before its lease runs out and another instance \
                         sends the event again",
                        humantime::format_duration(least)
                    ),
                );
            }
        }
        if let (Some(connect), Some(request)) = (connect_timeout, request_timeout) {
            if connect > request {
                problem(
                    problems,
                    "delivery.connect_timeout",
                    "must not be longer than delivery.request_timeout, which includes it",
                );
            }
        }
        let mut allowed_networks = Vec::new();
        for (i, text) in self.allowed_networks.unwrap_or_default().iter().enumerate() {
            match text.trim().parse::<ipnet::IpNet>() {
                Ok(net) => allowed_networks.push(net),
                // A bare address means just that address.
                Err(_) => match text.trim().parse::<std::net::IpAddr>() {
                    Ok(ip) => allowed_networks.push(ipnet::IpNet::from(ip)),
                    Err(_) => problem(
                        problems,
                        &format!("delivery.allowed_networks[{i}]"),
                        format!("{text:?} is not a network like \"10.20.0.0/16\" or an address"),
                    ),
                },
            }
        }
        let tls_ca_pem = match &self.tls_ca_file {
            None => Some(None),
            Some(path) => read_pem(
                problems,
                "delivery.tls_ca_file",
                &path.display().to_string(),
                "CERTIFICATE",
            )
            .map(Some),
        };
        let endpoint_concurrency = in_range(
            problems,
            "delivery.endpoint_concurrency",
            self.endpoint_concurrency
                .unwrap_or(DEFAULT_ENDPOINT_CONCURRENCY),
            1,
            1000,
        );
        // Unset, the ceiling and the cap per destination are at least the
        // cap per endpoint: a configuration that raised it above their
        // defaults stays valid.
        let cap_or_default = endpoint_concurrency.unwrap_or(DEFAULT_ENDPOINT_CONCURRENCY);
        let at_least_the_cap = |problems: &mut Vec<Problem>,
                                key: &str,
                                set: Option<u32>,
                                default: u32,
                                max: u32| {
            let value = in_range(
                problems,
                key,
                set.unwrap_or(default.max(cap_or_default)),
                1,
                max,
            )?;
            match endpoint_concurrency {
                Some(cap) if value < cap => {
                    problem(
                        problems,
                        key,
                        format!(
                            "must be at least delivery.endpoint_concurrency ({cap}), got {value}"
                        ),
                    );
                    None
                }
                _ => Some(value),
            }
        };
        let max_in_flight_ceiling = at_least_the_cap(
            problems,
            "delivery.max_in_flight_ceiling",
            self.max_in_flight_ceiling,
            DEFAULT_MAX_IN_FLIGHT_CEILING,
            1000,
        );
        let destination_concurrency = at_least_the_cap(
            problems,
            "delivery.destination_concurrency",
            self.destination_concurrency,
            DEFAULT_DESTINATION_CONCURRENCY,
            10_000,
        );
        Some(DeliveryConfig {
            endpoint_concurrency: endpoint_concurrency?,
            max_in_flight_ceiling: max_in_flight_ceiling?,
            destination_concurrency: destination_concurrency?,
            allowed_networks,
            require_https: self.require_https.unwrap_or(false),
            tls_ca_pem: tls_ca_pem?,
            concurrency: concurrency? as usize,
            poll_interval: poll_interval?,
            connect_timeout: connect_timeout?,
            request_timeout: request_timeout?,
            lease: lease?,
            max_response_bytes: max_response_bytes? as usize,
            drain_timeout: drain_timeout?,
        })
    }
}

/// The shortest lease accepted for a request timeout: two full attempts'
/// worth plus 10 s for recording the outcome, so a lease only runs out when
/// its daemon is really gone.
pub fn min_lease(request_timeout: Duration) -> Duration {
    request_timeout * 2 + Duration::from_secs(10)
}
