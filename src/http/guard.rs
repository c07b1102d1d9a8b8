//! The destination guard: endpoint URLs are written by tenants, so without a
//! check one could point outboxd at the cloud metadata service, the database
//! or anything else on the private network (SSRF).
//!
//! By default every special-purpose range is refused: loopback, private,
//! link-local, CGNAT, multicast, unspecified, IPv6 unique-local and
//! site-local, documentation and reserved ranges. `delivery.allowed_networks` opts ranges
//! back in. The check applies to the address outboxd actually connects to:
//! the resolver drops refused addresses after DNS, and the connector checks
//! the connected socket's peer again, so neither an IP literal nor a DNS
//! answer that changes between lookups (rebinding) gets around it.
//!
//! A refusal has two audiences. What it reads as ([`Refused`]'s `Display`)
//! becomes the event's `last_error` and the company's email, which tenants
//! read: it names neither the address the host resolved to nor its range,
//! or a tenant could map the internal network by pointing an endpoint at
//! name after name. The address, range and kind are in [`Refused`]'s fields,
//! which the client logs at warn for the operator.
//!
//! `delivery.allowed_networks` is the only list, and it is global: a range
//! opened there is open to every tenant's endpoints. There is no list per
//! endpoint.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::net::TcpStream;
use tower_service::Service;

/// Ranges refused unless allow-listed, with the name used in the refusal.
const BLOCKED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "unspecified (\"this network\")"),
    ("10.0.0.0/8", "private network"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    (
        "169.254.0.0/16",
        "link-local (cloud metadata services live here)",
    ),
    ("172.16.0.0/12", "private network"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private network"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation"),
    ("100::/64", "discard-only"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local (IPv6 private network)"),
    ("fe80::/10", "link-local"),
    // Deprecated (RFC 3879) but still routed inside some networks.
    ("fec0::/10", "site-local (deprecated IPv6 private network)"),
    ("ff00::/8", "multicast"),
];

/// Why a destination was refused. Permanent: retrying cannot change it.
///
/// Displayed, it is the text tenants read, the same whatever the address:
/// the fields are for the operator's log (the client logs them at warn),
/// never for text that is stored or emailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub addr: IpAddr,
    pub range: IpNet,
    pub what: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "destination not allowed: the endpoint's host is, or resolves to, an address \
             outboxd may not reach (loopback, a private network or another special-purpose \
             range); only outboxd's operator can open a range (delivery.allowed_networks)",
        )
    }
}

impl StdError for Refused {}

/// Which destinations may be connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    blocked: Vec<(IpNet, &'static str)>,
    allowed: Vec<IpNet>,
}

impl Policy {
    /// The default blocklist with `allowed` opted back in.
    pub fn new(allowed: Vec<IpNet>) -> Policy {
        let blocked = BLOCKED
            .iter()
            .map(|(net, what)| (net.parse().expect("a valid built-in range"), *what))
            .collect();
        Policy { blocked, allowed }
    }

    /// Refuses `addr` if it is in a blocked range that no allowed range
    /// covers. IPv4-mapped and IPv4-embedding IPv6 forms are judged by the
    /// IPv4 address they carry.
    pub fn check(&self, addr: IpAddr) -> Result<(), Refused> {
        let addr = canonical(addr);
        if self.allowed.iter().any(|net| net.contains(&addr)) {
            return Ok(());
        }
        match self.blocked.iter().find(|(net, _)| net.contains(&addr)) {
            Some((range, what)) => Err(Refused {
                addr,
                range: *range,
                what,
            }),
            None => Ok(()),
        }
    }
}

/// The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible
/// (::a.b.c.d), NAT64 (64:ff9b::/96), 6to4 (2002::/16) or Teredo
/// (2001::/32, RFC 4380: the client's address, inverted, in the last 32
/// bits) IPv6 address, so that a private IPv4 address cannot hide in IPv6
/// notation. The local-use translation prefix 64:ff9b:1::/48 (RFC 8215) is
/// not unwrapped: it is refused whole, as its translators are private.
fn canonical(addr: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = addr else { return addr };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    if s[..6] == [0, 0, 0, 0, 0, 0] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
        return IpAddr::V4(embedded(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return IpAddr::V4(embedded(s[1], s[2]));
    }
    if s[..2] == [0x2001, 0] {
        return IpAddr::V4(embedded(!s[6], !s[7]));
    }
    addr
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// DNS through tokio, keeping only the addresses the policy allows. A name
/// whose every address is refused fails with the first refusal.
#[derive(Clone)]
pub struct GuardedResolver {
    policy: Arc<Policy>,
}

impl Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        first_refusal.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), first_refusal) {
                (true, Some(refused)) => Err(Box::new(refused) as BoxError),
                _ => Ok(allowed.into_iter()),
            }
        })
    }
}

/// The TCP connector with the policy applied before connecting to an IP
/// literal and, whatever the host, to the peer of the connected socket.
#[derive(Clone)]
pub struct GuardedConnector {
    inner: HttpConnector<GuardedResolver>,
    policy: Arc<Policy>,
}

impl GuardedConnector {
    /// `configure` sets the inner connector's timeouts and options.
    pub fn new(
        policy: Policy,
        configure: impl FnOnce(&mut HttpConnector<GuardedResolver>),
    ) -> Self {
        let policy = Arc::new(policy);
        let mut inner = HttpConnector::new_with_resolver(GuardedResolver {
            policy: policy.clone(),
        });
        configure(&mut inner);
        GuardedConnector { inner, policy }
    }
}

impl Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let policy = self.policy.clone();
        let literal = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<IpAddr>().ok());
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            if let Some(ip) = literal {
                policy.check(ip)?;
            }
            let stream = connecting.await?;
            let peer = stream.inner().peer_addr()?;
            policy.check(peer.ip())?;
            Ok(stream)
        })
    }
}

/// Finds a [`Refused`] in an error's chain: the client wraps what the
/// connector returned.
pub fn refusal_in<'a>(mut e: &'a (dyn StdError + 'static)) -> Option<&'a Refused> {
    loop {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        e = e.source()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_ranges_are_refused_and_public_addresses_pass() {
        let policy = Policy::new(vec![]);
        #[rustfmt::skip]
        let cases: &[(&str, Option<&str>)] = &[
            ("127.0.0.1", Some("loopback")),
            ("127.255.0.9", Some("loopback")),
            ("10.1.2.3", Some("private network")),
            ("172.16.0.1", Some("private network")),
            ("172.31.255.255", Some("private network")),
            ("172.32.0.1", None),
            ("192.168.1.1", Some("private network")),
            ("169.254.169.254", Some("link-local")),
            ("100.64.0.1", Some("carrier-grade NAT")),
            ("224.0.0.1", Some("multicast")),
            ("0.0.0.0", Some("unspecified")),
            ("192.0.2.10", Some("documentation")),
            ("255.255.255.255", Some("reserved")),
            ("8.8.8.8", None),
            ("93.184.216.34", None),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fe80::1", Some("link-local")),
            ("fd12:3456::1", Some("unique local")),
            ("ff02::1", Some("multicast")),
            ("2001:db8::1", Some("documentation")),
            ("2606:4700::1111", None),
            // Private IPv4 hiding in IPv6 forms.
            ("::ffff:10.0.0.1", Some("private network")),
            ("::ffff:169.254.169.254", Some("link-local")),
            ("::127.0.0.1", Some("loopback")),
            ("64:ff9b::a00:1", Some("private network")),
            ("2002:a00:1::1", Some("private network")),
            ("::ffff:8.8.8.8", None),
            ("fec0::1", Some("site-local")),
            ("64:ff9b:1::808:808", Some("local-use IPv4/IPv6 translation")),
            // Teredo: server 65.54.227.120, client 10.0.0.1 / 127.0.0.1 /
            // 8.8.8.8, each stored inverted.
            ("2001:0:4136:e378:8000:63bf:f5ff:fffe", Some("private network")),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", Some("loopback")),
            ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
        ];
        for (addr, want) in cases {
            let got = policy.check(addr.parse().unwrap());
            match (got, want) {
                (Ok(()), None) => {}
                (Err(r), Some(what)) => assert!(r.what.contains(what), "{addr}: {r}"),
                (got, want) => panic!("{addr}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn allowed_networks_opt_ranges_back_in() {
        let policy = Policy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.20.0.0/16".parse().unwrap(),
        ]);
        assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(policy.check("10.20.3.4".parse().unwrap()).is_ok());
        assert!(policy.check("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(policy.check("10.21.0.1".parse().unwrap()).is_err());
        assert!(
            policy.check("::1".parse().unwrap()).is_err(),
            "IPv6 loopback not in the list"
        );
    }

    #[test]
    fn a_refusal_says_what_to_do_and_names_no_address() {
        let policy = Policy::new(vec![]);
        let metadata = policy
            .check("169.254.169.254".parse().unwrap())
            .unwrap_err();
        let private = policy.check("10.1.2.3".parse().unwrap()).unwrap_err();
        let text = metadata.to_string();
        assert!(text.contains("delivery.allowed_networks"), "{text}");
        // The tenant's text is the same for every refused address.
        assert_eq!(text, private.to_string());
        for hidden in ["169.254", "link-local", "10.1.2.3", "10.0.0.0/8"] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
        assert_eq!(metadata.addr.to_string(), "169.254.169.254");
        assert_eq!(private.range.to_string(), "10.0.0.0/8");
    }

    #[tokio::test]
    async fn the_connector_refuses_literal_loopback_and_names_resolving_to_it() {
        // Nothing needs to listen: the guard refuses before connecting.
        for url in [
            "http://127.0.0.1:9/",
            "http://[::1]:9/",
            "http://localhost:9/",
        ] {
            let mut connector = GuardedConnector::new(Policy::new(vec![]), |_| {});
            let err = connector.call(url.parse().unwrap()).await.unwrap_err();
            let refused = refusal_in(err.as_ref()).unwrap_or_else(|| panic!("{url}: {err}"));
            assert!(refused.what.contains("loopback"), "{url}: {refused}");
        }
    }

    #[tokio::test]
    async fn the_connector_connects_where_allowed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut connector =
            GuardedConnector::new(Policy::new(vec!["127.0.0.0/8".parse().unwrap()]), |_| {});
        let uri: Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
        assert!(connector.call(uri).await.is_ok());
    }
}
