//! Table-driven tests of loading and validating the configuration.

use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};

use super::{CircuitConfig, ConfigError, LogFormat, RawConfig, Secret};

fn raw_from_toml(text: &str) -> Result<RawConfig, Box<figment::Error>> {
    Figment::new()
        .merge(Toml::string(text))
        .extract()
        .map_err(Box::new)
}

fn problems_of(text: &str) -> Vec<String> {
    match raw_from_toml(text).map(RawConfig::validate) {
        Err(e) => vec![format!("extract: {e}")],
        Ok(Ok(_)) => vec![],
        Ok(Err(ConfigError::Invalid(problems))) => problems.into_iter().map(|p| p.key).collect(),
        Ok(Err(e)) => vec![format!("other: {e}")],
    }
}

#[test]
fn tls_parameters_are_taken_out_of_the_url() {
    let cases = [
        (
            "postgres://u@h:5433/db?sslmode=verify-full&application_name=x",
            "postgres://u@h:5433/db?application_name=x",
            Some("verify-full"),
            None,
        ),
        (
            "postgres://h/db?sslrootcert=%2Fetc%2Fca.pem&sslmode=require",
            "postgres://h/db",
            Some("require"),
            Some("/etc/ca.pem"),
        ),
        ("postgres://h/db", "postgres://h/db", None, None),
        (
            "host=h dbname=db sslmode=verify-ca  password='a  b'",
            "host=h dbname=db  password='a  b'",
            Some("verify-ca"),
            None,
        ),
        (
            "host=h dbname=db  password='a  b'",
            "host=h dbname=db  password='a  b'",
            None,
            None,
        ),
    ];
    for (url, rest, mode, ca) in cases {
        let (left, found) = super::tls::take_url_tls(url);
        assert_eq!(left, rest, "{url}");
        assert_eq!(found.sslmode.as_deref(), mode, "{url}");
        assert_eq!(found.sslrootcert.as_deref(), ca, "{url}");
    }
}

#[test]
fn empty_config_uses_the_defaults() {
    let config = RawConfig::default().validate().unwrap();
    // Issue 27.8: outboxd's own role and database, not the superuser and
    // the maintenance database (the shipped config.toml states the same).
    assert_eq!(config.database.pg.get_dbname(), Some("outboxd"));
    assert_eq!(config.database.pg.get_user(), Some("outboxd"));
    assert_eq!(config.database.connect_timeout, Duration::from_secs(5));
    assert_eq!(config.database.schema_wait, Duration::from_secs(120));
    assert_eq!(config.delivery.endpoint_concurrency, 8);
    assert_eq!(config.delivery.max_in_flight_ceiling, 16);
    assert_eq!(config.delivery.destination_concurrency, 32);
    assert_eq!(
        crate::store::claim::Caps::of(&config.delivery),
        crate::store::claim::Caps::SHIPPED
    );
    assert_eq!(config.circuit, CircuitConfig::default());
    assert_eq!(config.circuit.open_after, 5);
    assert_eq!(config.circuit.max_hold, Duration::from_secs(24 * 3600));
    assert_eq!(config.database.pg.get_application_name(), Some("outboxd"));
    assert_eq!(config.log.level, "info");
    assert_eq!(config.log.format, LogFormat::Text);
}

#[test]
fn the_reference_config_is_valid_and_states_the_defaults() {
    let reference = raw_from_toml(include_str!("../../config.toml"))
        .unwrap()
        .validate()
        .unwrap();
    let defaults = RawConfig::default().validate().unwrap();
    assert_eq!(format!("{reference:?}"), format!("{defaults:?}"));
}

#[test]
fn each_bad_value_is_reported_under_its_key() {
    let cases: &[(&str, &[&str])] = &[
        ("", &[]),
        ("[database]\nconnect_timeout = \"2s\"", &[]),
        (
            "[database]\nconnect_timeout = \"soon\"",
            &["database.connect_timeout"],
        ),
        (
            "[database]\nconnect_timeout = \"0s\"",
            &["database.connect_timeout"],
        ),
        ("[delivery]\nendpoint_concurrency = 1", &[]),
        ("[delivery]\nendpoint_concurrency = 1000", &[]),
        (
            "[delivery]\nendpoint_concurrency = 0",
            &["delivery.endpoint_concurrency"],
        ),
        (
            "[delivery]\nendpoint_concurrency = 1001",
            &["delivery.endpoint_concurrency"],
        ),
        // The ceiling on an endpoint's own max_in_flight, and the cap per
        // destination: within bounds, and not below the cap per endpoint.
        ("[delivery]\nmax_in_flight_ceiling = 1000", &[]),
        ("[delivery]\nmax_in_flight_ceiling = 8", &[]),
        (
            "[delivery]\nmax_in_flight_ceiling = 0",
            &["delivery.max_in_flight_ceiling"],
        ),
        (
            "[delivery]\nmax_in_flight_ceiling = 1001",
            &["delivery.max_in_flight_ceiling"],
        ),
        (
            "[delivery]\nmax_in_flight_ceiling = 7",
            &["delivery.max_in_flight_ceiling"],
        ),
        (
            "[delivery]\nendpoint_concurrency = 20\nmax_in_flight_ceiling = 20\ndestination_concurrency = 20",
            &[],
        ),
        // Unset, they follow a raised cap per endpoint.
        ("[delivery]\nendpoint_concurrency = 1000", &[]),
        (
            "[delivery]\nendpoint_concurrency = 20\nmax_in_flight_ceiling = 16",
            &["delivery.max_in_flight_ceiling"],
        ),
        ("[delivery]\ndestination_concurrency = 10000", &[]),
        ("[delivery]\ndestination_concurrency = 8", &[]),
        (
            "[delivery]\ndestination_concurrency = 0",
            &["delivery.destination_concurrency"],
        ),
        (
            "[delivery]\ndestination_concurrency = 10001",
            &["delivery.destination_concurrency"],
        ),
        (
            "[delivery]\nendpoint_concurrency = 4\ndestination_concurrency = 3",
            &["delivery.destination_concurrency"],
        ),
        (
            "[delivery]\nendpoint_concurrency = 40\ndestination_concurrency = 32",
            &["delivery.destination_concurrency"],
        ),
        ("[circuit]\nopen_after = 1\ncooldown = \"1s\"", &[]),
        ("[circuit]\nopen_after = 0", &["circuit.open_after"]),
        ("[circuit]\ncooldown = \"0s\"", &["circuit.cooldown"]),
        ("[circuit]\ncooldown = \"soon\"", &["circuit.cooldown"]),
        (
            "[circuit]\ncooldown = \"5m\"\nmax_cooldown = \"1m\"",
            &["circuit.max_cooldown"],
        ),
        ("[circuit]\nmax_hold = \"0s\"", &["circuit.max_hold"]),
        ("[circuit]\nmax_hold = \"2h\"", &[]),
        ("[database]\nschema_wait = \"0s\"", &[]),
        ("[database]\nschema_wait = \"5m\"", &[]),
        (
            "[database]\nschema_wait = \"later\"",
            &["database.schema_wait"],
        ),
        (
            "[database]\nurl = \"postgres://h/db?sslmode=bogus\"",
            &["database.url"],
        ),
        ("[database]\nurl = \"postgres://h/db?sslmode=require\"", &[]),
        (
            "[database]\nurl = \"postgres://h/db?sslmode=verify-full\"",
            &[],
        ),
        (
            "[database]\nurl = \"host=h dbname=db sslmode=verify-ca\"",
            &[],
        ),
        (
            "[database]\nurl = \"postgres://h/db?sslmode=prefer\"",
            &["database.url"],
        ),
        ("[database]\ntls = \"prefer\"", &["database.tls"]),
        ("[database]\ntls = \"allow\"", &["database.tls"]),
        ("[database]\ntls = \"on\"", &["database.tls"]),
        ("[database]\ntls = \"verify-full\"", &[]),
        (
            "[database]\nurl = \"postgres://h/db?sslmode=require\"\ntls = \"verify-full\"",
            &["database.tls"],
        ),
        (
            "[database]\nurl = \"postgres://h/db?sslmode=verify-full\"\ntls = \"verify-full\"",
            &[],
        ),
        (
            "[database]\ntls_ca_file = \"/nonexistent/ca.pem\"",
            &["database.tls_ca_file"],
        ),
        (
            "[database]\ntls = \"verify-full\"\ntls_ca_file = \"/nonexistent/ca.pem\"",
            &["database.tls_ca_file"],
        ),
        (
            "[database]\ntls = \"verify-full\"\ntls_ca_file = \"/etc/hostname\"",
            &["database.tls_ca_file"],
        ),
        (
            "[database]\ntls = \"require\"\ntls_cert_file = \"/nonexistent/c.pem\"",
            &["database.tls_cert_file"],
        ),
        (
            "[database]\ntls = \"verify-full\"\nurl = \"postgres://h/db?sslrootcert=system\"",
            &[],
        ),
        (
            "[database]\nurl = \"postgres://h:notaport/db\"",
            &["database.url"],
        ),
        ("[database]\nurl = \"postgres://h\"", &["database.url"]),
        (
            "[database]\npassword = \"a\"\npassword_file = \"/x\"",
            &["database.password"],
        ),
        (
            "[database]\npassword_file = \"/nonexistent/outboxd-secret\"",
            &["database.password_file"],
        ),
        ("[log]\nformat = \"xml\"", &["log.format"]),
        ("[delivery]\nconcurrency = 0", &["delivery.concurrency"]),
        ("[delivery]\nrequest_timeout = \"30s\"", &["delivery.lease"]),
        (
            "[delivery]\nrequest_timeout = \"30s\"\nlease = \"70s\"",
            &[],
        ),
        (
            "[delivery]\nconnect_timeout = \"20s\"",
            &["delivery.connect_timeout"],
        ),
        (
            "[delivery]\nmax_response_bytes = 10",
            &["delivery.max_response_bytes"],
        ),
        ("[retry]\nmax_attempts = 0", &["retry.max_attempts"]),
        ("[retry]\njitter = 1.5", &["retry.jitter"]),
        ("[retry]\nbase_delay = \"2h\"", &["retry.base_delay"]),
        ("[retry]\nmax_age = \"400days\"", &["retry.max_age"]),
        ("[smtp]\nhost = \"mail.example.com\"", &["smtp.from"]),
        (
            "[smtp]\nhost = \"h\"\nfrom = \"Ops <ops@x.com>\"",
            &["smtp.from"],
        ),
        (
            "[smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\ntls = \"ssl\"",
            &["smtp.tls"],
        ),
        (
            "[smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\nusername = \"u\"",
            &["smtp.username"],
        ),
        (
            "[smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\nusername = \"u\"\npassword = \"p\"",
            &[],
        ),
        ("[smtp]\nfrom = \"not checked without a host\"", &[]),
        ("[notify]\nwindow = \"soon\"", &["notify.window"]),
        ("[metrics]\nlisten = \"localhost\"", &["metrics.listen"]),
        ("[retention]\ndelivered = \"400days\"", &[]),
        ("[retention]\nfailed = \"forever\"", &["retention.failed"]),
        ("[retention]\nbatch_size = 0", &["retention.batch_size"]),
        (
            "[delivery]\nallowed_networks = [\"127.0.0.0/8\", \"::1\"]",
            &[],
        ),
        (
            "[delivery]\nallowed_networks = [\"10.0.0.0/8\", \"intranet\"]",
            &["delivery.allowed_networks[1]"],
        ),
        ("[metrics]\nlisten = \"off\"", &[]),
        ("[metrics]\nlisten = \"[::1]:7464\"", &[]),
        ("[log]\nlevel = \"outboxd=loud\"", &["log.level"]),
        ("[log]\nlevel = \"debug\"\nformat = \"json\"", &[]),
        (
            "[database]\nconnect_timeout = \"x\"\n[log]\nformat = \"xml\"",
            &["database.connect_timeout", "log.format"],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(problems_of(text), *want, "config:\n{text}");
    }
}

#[test]
fn smtp_port_follows_the_tls_mode() {
    for (tls, port) in [("starttls", 587), ("implicit", 465), ("none", 25)] {
        let text = format!("[smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\ntls = \"{tls}\"");
        let config = raw_from_toml(&text).unwrap().validate().unwrap();
        assert_eq!(config.notify.smtp.unwrap().port, port, "{tls}");
    }
    let config = RawConfig::default().validate().unwrap();
    assert_eq!(config.notify.smtp, None);
}

#[test]
fn unknown_keys_and_wrong_types_name_the_key() {
    let err = raw_from_toml("[database]\npasword = \"x\"").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("pasword"), "{text}");

    let err = raw_from_toml("[database]\nconnect_timeout = 5").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("database.connect_timeout"), "{text}");
}

#[test]
fn password_file_is_read_and_trimmed_of_one_newline() {
    let dir = std::env::temp_dir().join(format!("outboxd-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pw");
    std::fs::write(&path, "s3cret\n").unwrap();
    let text = format!(
        "[database]\npassword_file = {:?}",
        path.display().to_string()
    );
    let config = raw_from_toml(&text).unwrap().validate().unwrap();
    assert_eq!(config.database.pg.get_password(), Some(&b"s3cret"[..]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secrets_do_not_show_in_debug_output() {
    let text = "[database]\nurl = \"postgres://u:urlpw@h/db\"\npassword = \"filepw\"\n\
                [smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\nusername = \"u\"\npassword = \"smtppw\"";
    let raw = raw_from_toml(text).unwrap();
    let raw_debug = format!("{raw:?}");
    let config = raw.validate().unwrap();
    let debug = format!("{config:?}");
    for shown in [raw_debug, debug, format!("{:?}", Secret::new("tok"))] {
        assert!(!shown.contains("urlpw"), "{shown}");
        assert!(!shown.contains("filepw"), "{shown}");
        assert!(!shown.contains("smtppw"), "{shown}");
        assert!(!shown.contains("tok\""), "{shown}");
    }
}
