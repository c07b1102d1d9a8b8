//! Log output: human-readable text by default, JSON lines on request, to
//! stderr; under systemd (stderr is the journal) or with `log.format =
//! "journald"`, each line starts with its syslog priority so that the
//! journal files it at the right level. `RUST_LOG`, when set, overrides
//! `log.level`. The level can be changed while running (SIGHUP re-reads
//! `log.level`): the filter sits behind a reload handle.

use std::io::{IsTerminal, Write};

use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// Changes the active filter of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle {
    reload: Option<reload::Handle<EnvFilter, Registry>>,
    /// The filter came from RUST_LOG, which a reload does not re-read.
    from_env: bool,
}

impl LogHandle {
    /// Applies a new `log.level`. Refused while RUST_LOG rules, since the
    /// operator chose that explicitly for this process.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.from_env {
            return Err("RUST_LOG is set and takes precedence over log.level".into());
        }
        let Some(reload) = &self.reload else {
            return Err("logging was set up elsewhere".into());
        };
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| format!("log.level: {e}"))?;
        reload.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls
/// leave the first subscriber in place and get a handle that cannot reload).
pub fn init(config: &LogConfig) -> LogHandle {
    let (filter, from_env) = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            match EnvFilter::builder().parse(&directives) {
                Ok(filter) => (filter, true),
                Err(e) => {
                    eprintln!("outboxd: ignoring RUST_LOG ({e}); using log.level");
                    (EnvFilter::new(&config.level), false)
                }
            }
        }
        _ => (EnvFilter::new(&config.level), false),
    };
    let (filter, reload) = reload::Layer::new(filter);
    let journal = stderr_is_the_journal();
    let format = match config.format {
        LogFormat::Text if journal => LogFormat::Journald,
        format => format,
    };
    let output = match format {
        LogFormat::Journald => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .without_time()
            .with_writer(Prioritised)
            .boxed(),
        // Colours only for a person at a terminal, not in journald or a file.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        // In the journal too each line gets its priority, which the journal
        // takes off again: the stored message is the JSON object.
        LogFormat::Json if journal => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(Prioritised)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok();
    LogHandle {
        reload: installed.then_some(reload),
        from_env,
    }
}

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM`
/// to the device and inode of the stream it gave the service, and stderr is
/// that stream unless the service redirected it.
fn stderr_is_the_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        v.split_once(':')
            .map(|(d, i)| (d.to_string(), i.to_string()))
    }) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// The syslog priority of a level, as the journal reads it from the start
/// of a line: error 3, warning 4, info 6, debug and trace 7.
pub fn priority(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"<3>",
        Level::WARN => b"<4>",
        Level::INFO => b"<6>",
        _ => b"<7>",
    }
}

/// Stderr, each event's line led by its priority.
struct Prioritised;

/// One event's writer: the priority goes out before its first byte.
struct PrioritisedLine {
    priority: Option<&'static [u8]>,
    stderr: std::io::Stderr,
}

impl Write for PrioritisedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(priority) = self.priority.take() {
            let mut lock = self.stderr.lock();
            lock.write_all(priority)?;
            lock.write_all(buf)?;
            return Ok(buf.len());
        }
        self.stderr.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stderr.flush()
    }
}

impl<'a> MakeWriter<'a> for Prioritised {
    type Writer = PrioritisedLine;

    fn make_writer(&'a self) -> PrioritisedLine {
        PrioritisedLine {
            priority: Some(priority(&Level::INFO)),
            stderr: std::io::stderr(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> PrioritisedLine {
        PrioritisedLine {
            priority: Some(priority(meta.level())),
            stderr: std::io::stderr(),
        }
    }
}
