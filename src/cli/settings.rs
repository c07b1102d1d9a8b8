//! `outboxd endpoint set`'s flags, and checking them into the [`Settings`]
//! to save: every flag checked with [`super::rules`], the secret files
//! read, and every problem collected (each naming its flag) before anything
//! connects to the database. A secret's value never appears in a problem.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::exit::CliError;
use super::rules;
use crate::config;
use crate::model::{Auth, PAYMENT_CANCELLATION, Secret};

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The company's id
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
    company: i64,

    /// The event type the endpoint receives
    #[arg(long, value_name = "TYPE", default_value = PAYMENT_CANCELLATION)]
    event: String,

    /// Where to POST: http:// or https://, with a host, no credentials in it
    #[arg(long)]
    url: String,

    /// How to authenticate: none, basic (--username, --password-file) or
    /// bearer (--token-file)
    #[arg(long, value_enum, default_value_t = AuthType::None)]
    auth: AuthType,

    /// User name for --auth basic
    #[arg(long, value_name = "NAME")]
    username: Option<String>,

    /// File holding the password for --auth basic
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,

    /// File holding the token for --auth bearer
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// Up to 5 addresses, comma-separated, emailed when an event fails for good
    #[arg(long, value_name = "EMAILS")]
    notify: Option<String>,

    /// Save it disabled: events are not sent to it until `endpoint enable`
    #[arg(long)]
    disabled: bool,

    /// Requests in flight to it at most, per outboxd instance (1-1000;
    /// default: the daemon's delivery.endpoint_concurrency; counts for at
    /// most its delivery.max_in_flight_ceiling)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    max_in_flight: Option<i32>,

    /// File holding a Standard Webhooks signing secret (whsec_…): it
    /// replaces the endpoint's secrets, and every request is signed with
    /// it. Left out, the secrets stay as they are (`endpoint secret`).
    #[arg(long, value_name = "FILE")]
    signing_secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuthType {
    None,
    Basic,
    Bearer,
}

/// `set`'s flags, checked, secrets read: what to save.
pub struct Settings {
    pub company: i64,
    pub event: String,
    pub url: String,
    pub auth: Auth,
    pub notify: Vec<String>,
    pub enabled: bool,
    pub max_in_flight: Option<i32>,
    /// The one signing secret to keep, when given.
    pub signing_secret: Option<Secret>,
}

impl SetArgs {
    /// Every problem with the flags, each naming its flag, or the settings.
    pub fn validate(self) -> Result<Settings, CliError> {
        let mut problems = Vec::new();
        if let Err(e) = rules::event_type(&self.event) {
            problems.push(format!("--event: {e}"));
        }
        if let Err(e) = rules::webhook_url(&self.url) {
            problems.push(format!("--url: {e}"));
        }
        let notify = rules::notify_list(self.notify.as_deref().unwrap_or(""));
        for e in rules::notify_problems(&notify) {
            problems.push(format!("--notify: {e}"));
        }
        let auth = self.auth(&mut problems);
        let signing_secret = self.signing_secret_file.as_deref().and_then(|path| {
            let text = secret("--signing-secret-file", Some(path), "", &mut problems)?;
            match crate::http::sign::SigningKey::parse(text.expose()) {
                Ok(_) => Some(Secret::new(text.expose().trim())),
                Err(e) => {
                    problems.push(format!("--signing-secret-file: {e}"));
                    None
                }
            }
        });
        match auth {
            Some(auth) if problems.is_empty() => Ok(Settings {
                signing_secret,
                company: self.company,
                event: self.event,
                url: self.url,
                auth,
                notify,
                enabled: !self.disabled,
                max_in_flight: self.max_in_flight,
            }),
            _ => Err(CliError::Invalid(problems)),
        }
    }

    /// The auth type's secrets: present when it needs them, absent when not.
    fn auth(&self, problems: &mut Vec<String>) -> Option<Auth> {
        let given = [
            ("--username", self.username.is_some()),
            ("--password-file", self.password_file.is_some()),
            ("--token-file", self.token_file.is_some()),
        ];
        let (used, takes): (&[&str], &str) = match self.auth {
            AuthType::None => (&[], "no secrets"),
            AuthType::Basic => (
                &["--username", "--password-file"],
                "--username and --password-file",
            ),
            AuthType::Bearer => (&["--token-file"], "--token-file"),
        };
        let auth_name = self.auth.to_possible_value().expect("no skipped variants");
        for (flag, _) in given.iter().filter(|(f, g)| *g && !used.contains(f)) {
            problems.push(format!(
                "{flag}: not used with --auth {} (it takes {takes})",
                auth_name.get_name()
            ));
        }
        match self.auth {
            AuthType::None => Some(Auth::None),
            AuthType::Basic => {
                let username = match self.username.as_deref() {
                    None | Some("") => {
                        problems.push("--username: --auth basic needs a user name".into());
                        None
                    }
                    Some(name) if name.contains(':') => {
                        problems.push(
                            "--username: must not contain ':' (Basic auth puts it between \
                             user name and password)"
                                .into(),
                        );
                        None
                    }
                    Some(name) => Some(name.to_string()),
                };
                let password = secret(
                    "--password-file",
                    self.password_file.as_deref(),
                    "--auth basic needs a file holding the password",
                    problems,
                );
                Some(Auth::Basic {
                    username: username?,
                    password: password?,
                })
            }
            AuthType::Bearer => {
                let token = secret(
                    "--token-file",
                    self.token_file.as_deref(),
                    "--auth bearer needs a file holding the token",
                    problems,
                )?;
                if token.expose().chars().any(|c| c.is_control() && c != '\t') {
                    problems.push(
                        "--token-file: the token contains a line break or another control \
                         character, which an HTTP header cannot carry"
                            .into(),
                    );
                    return None;
                }
                Some(Auth::Bearer { token })
            }
        }
    }
}

/// Reads a secret file the way the config's `…_file` keys are read.
/// `missing` says why the flag is needed when it was not given.
fn secret(
    flag: &str,
    path: Option<&Path>,
    missing: &str,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    let Some(path) = path else {
        problems.push(format!("{flag}: {missing}"));
        return None;
    };
    let mut found = Vec::new();
    let text = config::secret_file(&mut found, flag, path);
    problems.extend(found.iter().map(ToString::to_string));
    text.map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: SetArgs,
    }

    fn problems(args: &[&str]) -> Vec<String> {
        let wrap =
            Wrap::try_parse_from(std::iter::once("set").chain(args.iter().copied())).unwrap();
        match wrap.args.validate() {
            Ok(_) => Vec::new(),
            Err(CliError::Invalid(problems)) => problems,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_problem_is_reported_naming_its_flag() {
        let got = problems(&[
            "--company=1",
            "--event=Payment",
            "--url=ftp://x.example.com/",
            "--auth=bearer",
            "--username=sales",
            "--notify=a@x.com,b@x.com,c@x.com,d@x.com,e@x.com,nope",
        ]);
        let flags: Vec<&str> = got.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            flags,
            [
                "--event",
                "--url",
                "--notify",
                "--notify",
                "--username",
                "--token-file"
            ],
            "{got:#?}"
        );
    }

    #[test]
    fn auth_none_takes_no_secrets_and_basic_needs_both() {
        let base = ["--company=1", "--url=https://erp.example.com/"];
        assert!(problems(&base).is_empty());
        let got = problems(&[base[0], base[1], "--token-file=/nonexistent"]);
        assert_eq!(
            got,
            ["--token-file: not used with --auth none (it takes no secrets)"]
        );
        let got = problems(&[base[0], base[1], "--auth=basic"]);
        assert_eq!(
            got,
            [
                "--username: --auth basic needs a user name",
                "--password-file: --auth basic needs a file holding the password"
            ]
        );
        let got = problems(&[
            base[0],
            base[1],
            "--auth=basic",
            "--username=a:b",
            "--password-file=/nonexistent/pw",
        ]);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(got[0].starts_with("--username: must not contain ':'"));
        assert!(got[1].starts_with("--password-file: cannot read /nonexistent/pw"));
    }
}
