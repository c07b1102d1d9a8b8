//! TLS to the database: `database.tls` and its files, libpq's TLS
//! parameters in `database.url`, and the PEM files both `[database]` and
//! `[delivery]` read.

use std::path::PathBuf;

use super::values::{Problem, problem};
use crate::model::Secret;

/// `database.tls`: libpq's `sslmode` values, less the two that fall back to
/// plaintext without saying so (`allow`, `prefer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS (a Unix socket, loopback, or a network you trust).
    Disable,
    /// TLS, the server's certificate not checked: encrypted, but open to
    /// whoever can place themselves in between.
    Require,
    /// TLS, the certificate signed by a trusted CA, whatever name it is for.
    VerifyCa,
    /// TLS, the certificate signed by a trusted CA and for the host name
    /// (or address) connected to.
    VerifyFull,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// TLS settings for the database connections.
#[derive(Debug, Clone)]
pub struct DatabaseTls {
    pub mode: TlsMode,
    /// PEM CA certificates to trust instead of the system's
    /// (`database.tls_ca_file`).
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate (PEM) and its PKCS#8 key (PEM, secret), for
    /// servers that ask for one.
    pub client: Option<(Vec<u8>, Secret)>,
}

/// libpq's TLS parameters found in a database URL (`postgres://…?sslmode=…`
/// or the `key=value` form), taken out of it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct UrlTls {
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl UrlTls {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "sslmode" => Some(&mut self.sslmode),
            "sslrootcert" => Some(&mut self.sslrootcert),
            "sslcert" => Some(&mut self.sslcert),
            "sslkey" => Some(&mut self.sslkey),
            _ => None,
        }
    }
}

/// The URL without its TLS parameters, and those parameters.
pub(super) fn take_url_tls(url: &str) -> (String, UrlTls) {
    let mut found = UrlTls::default();
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), found);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                match found.slot(key) {
                    Some(slot) => {
                        *slot = Some(
                            percent_encoding::percent_decode_str(value)
                                .decode_utf8_lossy()
                                .into_owned(),
                        );
                        false
                    }
                    None => true,
                }
            })
            .collect();
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (url, found);
    }
    // key=value words, split at whitespace outside single quotes; a TLS
    // word is cut out with the whitespace before it, the rest kept as
    // written.
    let mut kept = String::with_capacity(url.len());
    let mut word_start = None;
    let mut quoted = false;
    let mut escaped = false;
    let mut last_end = 0;
    let chars: Vec<(usize, char)> = url.char_indices().collect();
    for (n, &(i, c)) in chars.iter().enumerate() {
        let boundary = c.is_whitespace() && !quoted;
        if !boundary && word_start.is_none() {
            word_start = Some(i);
        }
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '\'' {
            quoted = !quoted;
        }
        let ends = boundary || n + 1 == chars.len();
        if let (true, Some(from)) = (ends, word_start) {
            let to = if boundary { i } else { url.len() };
            let word = &url[from..to];
            let taken = word.split_once('=').is_some_and(|(key, value)| {
                !value.starts_with('\'')
                    && found
                        .slot(key)
                        .map(|slot| *slot = Some(value.to_string()))
                        .is_some()
            });
            if taken {
                kept.push_str(url[last_end..from].trim_end());
                last_end = to;
            }
            word_start = None;
        }
    }
    kept.push_str(&url[last_end..]);
    (kept, found)
}

/// `database.tls` and its files, each also accepted in the URL under
/// libpq's name (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`); given both
/// ways, they must agree.
pub(super) fn database_tls(
    problems: &mut Vec<Problem>,
    url: UrlTls,
    mode: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> Option<DatabaseTls> {
    fn either(
        problems: &mut Vec<Problem>,
        key: &str,
        own: Option<String>,
        libpq: &str,
        in_url: Option<String>,
    ) -> Option<Option<(String, String)>> {
        match (own, in_url) {
            (Some(own), Some(in_url)) if own != in_url => {
                problem(
                    problems,
                    key,
                    format!("{own:?}, but database.url says {libpq}={in_url}: give one"),
                );
                None
            }
            (Some(own), _) => Some(Some((key.to_string(), own))),
            (None, Some(in_url)) => Some(Some(("database.url".to_string(), in_url))),
            (None, None) => Some(None),
        }
    }
    let path = |p: Option<PathBuf>| p.map(|p| p.display().to_string());
    let mode = either(problems, "database.tls", mode, "sslmode", url.sslmode);
    let ca = either(
        problems,
        "database.tls_ca_file",
        path(ca_file),
        "sslrootcert",
        url.sslrootcert,
    );
    let cert = either(
        problems,
        "database.tls_cert_file",
        path(cert_file),
        "sslcert",
        url.sslcert,
    );
    let key = either(
        problems,
        "database.tls_key_file",
        path(key_file),
        "sslkey",
        url.sslkey,
    );
    let (mode, ca, cert, key) = (mode?, ca?, cert?, key?);

    let mode = match mode {
        None => TlsMode::Disable,
        Some((key, text)) => match text.as_str() {
            "disable" => TlsMode::Disable,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            "prefer" | "allow" => {
                problem(
                    problems,
                    &key,
                    format!(
                        "{text:?} falls back to an unencrypted connection without saying so, which \
                         outboxd never does: use \"verify-full\" (with database.tls_ca_file for a \
                         private CA) or \"require\" to encrypt, or \"disable\""
                    ),
                );
                return None;
            }
            other => {
                problem(
                    problems,
                    &key,
                    format!(
                        "must be \"disable\", \"require\", \"verify-ca\" or \"verify-full\", got {other:?}"
                    ),
                );
                return None;
            }
        },
    };
    if mode == TlsMode::Disable {
        for (key, _) in [&ca, &cert, &key].into_iter().flatten() {
            problem(
                problems,
                key,
                "is set, but database.tls is \"disable\": set database.tls to use it",
            );
        }
        if ca.is_some() || cert.is_some() || key.is_some() {
            return None;
        }
    }
    // PostgreSQL 16's libpq takes sslrootcert=system for the system's CAs,
    // which is what no CA file means here.
    let ca_pem = match ca {
        Some((_, path)) if path == "system" => None,
        Some((key, path)) => {
            let pem = read_pem(problems, &key, &path, "CERTIFICATE")?;
            if native_tls::Certificate::stack_from_pem(&pem).is_err() {
                problem(
                    problems,
                    &key,
                    format!("{path}: the certificates do not parse"),
                );
                return None;
            }
            Some(pem)
        }
        None => None,
    };
    let client = match (cert, key) {
        (None, None) => None,
        (Some((key, _)), None) | (None, Some((key, _))) => {
            problem(
                problems,
                &key,
                "a client certificate needs both database.tls_cert_file and database.tls_key_file",
            );
            return None;
        }
        (Some((cert_key, cert_path)), Some((key_key, key_path))) => {
            let cert = read_pem(problems, &cert_key, &cert_path, "CERTIFICATE")?;
            let key_pem = match std::fs::read(&key_path) {
                Ok(pem) => pem,
                Err(e) => {
                    problem(problems, &key_key, format!("cannot read {key_path}: {e}"));
                    return None;
                }
            };
            let Ok(key_text) = String::from_utf8(key_pem) else {
                problem(problems, &key_key, format!("{key_path} is not a PEM file"));
                return None;
            };
            if !key_text.contains("-----BEGIN PRIVATE KEY-----") {
                problem(
                    problems,
                    &key_key,
                    format!(
                        "{key_path} holds no unencrypted PKCS#8 key (\"BEGIN PRIVATE KEY\"); \
                         convert it with `openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW`"
                    ),
                );
                return None;
            }
            if let Err(e) = native_tls::Identity::from_pkcs8(&cert, key_text.as_bytes()) {
                problem(
                    problems,
                    &key_key,
                    format!("{key_path} and {cert_path} do not make a client identity: {e}"),
                );
                return None;
            }
            Some((cert, Secret::new(key_text)))
        }
    };
    let tls = DatabaseTls {
        mode,
        ca_pem,
        client,
    };
    // What every connection will build: fail here, naming the setting.
    if tls.mode != TlsMode::Disable
        && let Err(e) = native_connector(&tls)
    {
        problem(problems, "database.tls", e);
        return None;
    }
    Some(tls)
}

/// The OpenSSL-backed connector for `tls`; an error names what failed.
pub fn native_connector(tls: &DatabaseTls) -> Result<native_tls::TlsConnector, String> {
    let mut builder = native_tls::TlsConnector::builder();
    match tls.mode {
        TlsMode::Disable | TlsMode::Require => {
            builder
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
        TlsMode::VerifyCa => {
            builder.danger_accept_invalid_hostnames(true);
        }
        TlsMode::VerifyFull => {}
    }
    if let Some(pem) = &tls.ca_pem {
        builder.disable_built_in_roots(true);
        let certificates = native_tls::Certificate::stack_from_pem(pem)
            .map_err(|e| format!("database.tls_ca_file: {e}"))?;
        for certificate in certificates {
            builder.add_root_certificate(certificate);
        }
    }
    if let Some((cert, key)) = &tls.client {
        let identity = native_tls::Identity::from_pkcs8(cert, key.expose().as_bytes())
            .map_err(|e| format!("database.tls_key_file: {e}"))?;
        builder.identity(identity);
    }
    builder.build().map_err(|e| format!("database.tls: {e}"))
}

/// The file at `path`, which must hold a PEM block of `label`.
pub(super) fn read_pem(
    problems: &mut Vec<Problem>,
    key: &str,
    path: &str,
    label: &str,
) -> Option<Vec<u8>> {
    let marker = format!("-----BEGIN {label}-----");
    match std::fs::read(path) {
        Ok(pem) if pem.windows(marker.len()).any(|w| w == marker.as_bytes()) => Some(pem),
        Ok(_) => {
            problem(
                problems,
                key,
                format!("{path} holds no PEM {}", label.to_lowercase()),
            );
            None
        }
        Err(e) => {
            problem(problems, key, format!("cannot read {path}: {e}"));
            None
        }
    }
}
