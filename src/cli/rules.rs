//! Checks on operator input, done before anything touches the database so
//! that every problem is reported at once and a bad command changes nothing.
//!
//! The endpoint rules mirror the schema's (`sql/migrations/0001_outbox_schema.sql`:
//! `outbox.is_valid_email`, `outbox.is_valid_webhook_url`, the event type
//! pattern); the trigger stays the last word, these only say it sooner and
//! name the flag. Each function is pure and returns the problem as text
//! meant to follow the flag's name (`--url: …`).

use std::time::{Duration, SystemTime};

use uuid::Uuid;

/// The schema's limit on notification addresses per endpoint.
pub const MAX_NOTIFY_EMAILS: usize = 5;

/// `^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$`: lowercase words joined by dots.
pub fn event_type(text: &str) -> Result<(), String> {
    let words: Vec<&str> = text.split('.').collect();
    let word_ok = |w: &str| {
        let mut chars = w.chars();
        chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if words.len() >= 2 && words.iter().all(|w| word_ok(w)) {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not an event type: lowercase words joined by dots, \
             like \"payment.cancellation\""
        ))
    }
}

/// `outbox.is_valid_email`: at most 254 chars; a local part of letters,
/// digits and ``.!#$%&'*+/=?^_`{|}~-``; one `@`; a domain of at least two
/// dot-separated labels of letters, digits and inner hyphens; no leading
/// dot, no `..`, no `.@`.
pub fn is_valid_email(address: &str) -> bool {
    const LOCAL_SPECIALS: &str = ".!#$%&'*+/=?^_`{|}~-";
    if address.chars().count() > 254 {
        return false;
    }
    let Some((local, domain)) = address.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || LOCAL_SPECIALS.contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2 && labels.iter().all(|l| is_host_label(l));
    local_ok
        && domain_ok
        && !address.starts_with('.')
        && !address.contains("..")
        && !address.contains(".@")
}

/// `[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?`
fn is_host_label(label: &str) -> bool {
    !label.is_empty()
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The `--notify` list: comma-separated, blanks around each address and
/// empty items ignored, so `--notify ""` means none.
pub fn notify_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every problem with a `--notify` list: too many, and each malformed
/// address (addresses are not secrets, so they are named).
pub fn notify_problems(addresses: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    if addresses.len() > MAX_NOTIFY_EMAILS {
        problems.push(format!(
            "at most {MAX_NOTIFY_EMAILS} addresses are allowed, got {}",
            addresses.len()
        ));
    }
    for address in addresses.iter().filter(|a| !is_valid_email(a)) {
        problems.push(format!("{address:?} is not a valid email address"));
    }
    problems
}

/// `outbox.is_valid_webhook_url`, plus what the HTTP client itself needs: an
/// `http://` or `https://` URL with a host name, an IPv4 address or a
/// bracketed IPv6 address, an optional port (1–65535), no credentials, no
/// whitespace, at most 2048 chars.
pub fn webhook_url(url: &str) -> Result<(), String> {
    if url.chars().count() > 2048 {
        return Err("is longer than 2048 characters".into());
    }
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &url["https://".len()..]
    } else if lower.starts_with("http://") {
        &url["http://".len()..]
    } else {
        return Err(match url.split_once("://") {
            Some((scheme, _)) => format!("the scheme must be http or https, not {scheme:?}"),
            None => "must start with http:// or https://".into(),
        });
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.contains('@') {
        return Err(
            "must not carry credentials (user:password@); give them with \
                    --username and --password-file, or --token-file"
                .into(),
        );
    }
    if url.chars().any(char::is_whitespace) {
        return Err("must not contain whitespace (encode a space as %20)".into());
    }
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((ip, after)) => (
                !ip.is_empty()
                    && ip
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'),
                after,
            ),
            None => (false, ""),
        },
        None => {
            let (host, port) = match authority.find(':') {
                Some(at) => authority.split_at(at),
                None => (authority, ""),
            };
            (host.split('.').all(is_host_label), port)
        }
    };
    if authority.is_empty() {
        return Err("has no host".into());
    }
    if !host_ok {
        return Err(format!(
            "{authority:?} is not a host name, an IPv4 address or a bracketed IPv6 address"
        ));
    }
    if !port.is_empty() {
        let digits = port.strip_prefix(':').unwrap_or(port);
        let valid = (1..=5).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.parse::<u16>().is_ok_and(|p| p > 0);
        if !valid {
            return Err(format!("{port:?} is not a port (1 to 65535)"));
        }
    }
    // Last, what delivery parses it with: it refuses a few characters the
    // schema lets through (`<`, `>`, backtick, DEL).
    url.parse::<hyper::Uri>().map(|_| ()).map_err(|_| {
        "is not a URL the HTTP client accepts (percent-encode characters like < > `)".into()
    })
}

/// A `--since` value: a duration back from `now` ("2h", "3days", "1h 30m"),
/// or a point in time, RFC 3339 (`2026-11-27T17:00:00Z`,
/// `2026-11-27T18:00:00+01:00`, also with a space for the `T` and without
/// seconds' fraction) or a date (`2026-11-27`, midnight UTC).
pub fn since(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    let text = text.trim();
    if let Ok(back) = humantime::parse_duration(text) {
        return now
            .checked_sub(back)
            .ok_or_else(|| format!("{text:?} reaches back before 1970; give a shorter duration"));
    }
    timestamp(text).ok_or_else(|| {
        format!(
            "{text:?} is neither a duration (\"2h\", \"3days\") nor a time \
             (\"2026-11-27T17:00:00Z\", \"2026-11-27\")"
        )
    })
}

/// RFC 3339 with `Z` or a numeric offset, or a bare date.
fn timestamp(text: &str) -> Option<SystemTime> {
    if text.len() == 10 {
        return humantime::parse_rfc3339_weak(&format!("{text}T00:00:00Z")).ok();
    }
    // humantime reads UTC only: take a trailing ±HH:MM off and apply it.
    let (local, offset) = match text.len().checked_sub(6).map(|at| text.split_at(at)) {
        Some((local, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.as_bytes()[3] == b':' =>
        {
            let hours: u64 = off[1..3].parse().ok()?;
            let minutes: u64 = off[4..6].parse().ok()?;
            let seconds = Duration::from_secs(hours * 3600 + minutes * 60);
            (local, Some((off.starts_with('+'), seconds)))
        }
        _ => (text, None),
    };
    let t = humantime::parse_rfc3339_weak(local).ok()?;
    match offset {
        // 18:00+01:00 is 17:00Z.
        Some((true, off)) => t.checked_sub(off),
        Some((false, off)) => t.checked_add(off),
        None => Some(t),
    }
}

/// An event id on the command line.
pub fn event_id(text: &str) -> Result<Uuid, String> {
    Uuid::parse_str(text.trim()).map_err(|_| {
        format!("{text:?} is not an event id (a UUID such as 01a21df3-926e-7d08-a910-945c0efd0520)")
    })
}

/// `--orders 17899,17900`: positive integers, comma-separated, none twice
/// (what `outbox.enqueue_payment_cancellation` accepts).
pub fn order_ids(text: &str) -> Result<Vec<i64>, String> {
    let mut ids: Vec<i64> = Vec::new();
    for item in text.split(',').map(str::trim) {
        let id = item
            .parse::<i64>()
            .ok()
            .filter(|id| *id > 0 && !item.starts_with('+'))
            .ok_or_else(|| {
                format!("{item:?} is not an order id (positive integers joined by commas)")
            })?;
        if ids.contains(&id) {
            return Err(format!("order id {id} is given twice"));
        }
        ids.push(id);
    }
    Ok(ids)
}

/// `--since` as clap parses it: [`since`] from now.
pub fn since_arg(text: &str) -> Result<SystemTime, String> {
    since(text, SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types() {
        for good in ["payment.cancellation", "invoice.created", "a.b_2.c"] {
            assert!(event_type(good).is_ok(), "{good}");
        }
        for bad in [
            "payment",
            "Payment.cancellation",
            "payment.",
            ".x",
            "a..b",
            "a.2b",
            "a-b.c",
            "",
        ] {
            assert!(event_type(bad).is_err(), "{bad}");
        }
    }

    /// `tests/it/ops_cli.rs` also runs a list like this one through both
    /// this function and `outbox.is_valid_email`, so the two stay in step.
    const EMAIL_CASES: &[(&str, bool)] = &[
        ("ops@example.com", true),
        ("first.last+tag@sub.example.co.uk", true),
        ("o'brien@example.com", true),
        ("a@b.c", true),
        ("x@xn--bcher-kva.example", true),
        ("ops@localhost", false),
        ("ops@@example.com", false),
        ("ops@example..com", false),
        (".ops@example.com", false),
        ("ops.@example.com", false),
        ("o..ps@example.com", false),
        ("ops@-example.com", false),
        ("ops@example-.com", false),
        ("ops example@example.com", false),
        ("ops@exa_mple.com", false),
        ("@example.com", false),
        ("ops@", false),
        ("ops", false),
        ("", false),
        ("jörg@example.com", false),
    ];

    #[test]
    fn emails_follow_the_schema_rule() {
        for (address, want) in EMAIL_CASES {
            assert_eq!(is_valid_email(address), *want, "{address}");
        }
        let long = format!("{}@example.com", "a".repeat(243));
        assert_eq!(long.len(), 255);
        assert!(!is_valid_email(&long));
        assert!(is_valid_email(&long[1..]));
    }

    #[test]
    fn notify_lists() {
        assert_eq!(notify_list(" a@x.com, b@y.com ,"), ["a@x.com", "b@y.com"]);
        assert!(notify_list("").is_empty());
        let six: Vec<String> = (1..=6).map(|i| format!("u{i}@example.com")).collect();
        assert_eq!(
            notify_problems(&six),
            ["at most 5 addresses are allowed, got 6"]
        );
        let bad = notify_problems(&["ok@example.com".into(), "nope".into()]);
        assert_eq!(bad, ["\"nope\" is not a valid email address"]);
    }

    #[test]
    fn webhook_urls() {
        for good in [
            "https://erp.example.com/hooks/payment-cancelled",
            "http://127.0.0.1:8808/",
            "HTTPS://ERP.example.com",
            "http://[::1]:8080/x?y=1#z",
            "https://erp.example.com?x=1",
        ] {
            assert_eq!(webhook_url(good), Ok(()), "{good}");
        }
        let cases = [
            (
                "ftp://files.example.com/",
                "the scheme must be http or https",
            ),
            ("erp.example.com/hooks", "must start with http://"),
            (
                "https://user:pw@erp.example.com/",
                "must not carry credentials",
            ),
            ("https:///hooks", "has no host"),
            ("https://erp_example.com/", "is not a host name"),
            ("https://erp.example.com:0/", "is not a port"),
            ("https://erp.example.com:70000/", "is not a port"),
            ("https://erp.example.com:/", "is not a port"),
            ("https://erp.example.com/a b", "whitespace"),
            ("https://erp.example.com/a<b", "HTTP client accepts"),
            ("https://[zz]/", "bracketed IPv6"),
        ];
        for (url, want) in cases {
            let got = webhook_url(url).expect_err(url);
            assert!(got.contains(want), "{url}: {got}");
            assert!(!got.contains("pw@"), "never echo credentials: {got}");
        }
    }

    #[test]
    fn since_takes_durations_and_times() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(since("2h", now), Ok(now - Duration::from_secs(7200)));
        assert_eq!(
            since("3days", now),
            Ok(now - Duration::from_secs(3 * 86400))
        );
        let at = humantime::parse_rfc3339("2026-11-27T17:00:00Z").unwrap();
        for text in [
            "2026-11-27T17:00:00Z",
            "2026-11-27 17:00:00Z",
            "2026-11-27T18:00:00+01:00",
            "2026-11-27T15:30:00-01:30",
        ] {
            assert_eq!(since(text, now), Ok(at), "{text}");
        }
        assert_eq!(
            since("2026-11-27", now),
            Ok(humantime::parse_rfc3339("2026-11-27T00:00:00Z").unwrap())
        );
        for bad in ["yesterday", "2h ago", "2026-13-01", ""] {
            assert!(since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn order_id_lists() {
        assert_eq!(order_ids("17899,17900"), Ok(vec![17899, 17900]));
        assert_eq!(order_ids(" 5 , 6"), Ok(vec![5, 6]));
        for (bad, want) in [
            ("17899,x", "\"x\" is not an order id"),
            ("0", "\"0\" is not an order id"),
            ("-3", "\"-3\" is not an order id"),
            ("1,,2", "\"\" is not an order id"),
            ("", "\"\" is not an order id"),
            ("4,4", "order id 4 is given twice"),
        ] {
            assert_eq!(
                order_ids(bad).unwrap_err().split(" (").next().unwrap(),
                want.split(" (").next().unwrap(),
                "{bad}"
            );
        }
    }

    #[test]
    fn event_ids() {
        let id = "01a21df3-926e-7d08-a910-945c0efd0520";
        assert_eq!(event_id(id).unwrap().to_string(), id);
        assert!(event_id("1234").unwrap_err().contains("not an event id"));
    }
}
