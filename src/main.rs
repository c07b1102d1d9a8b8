//! The `outboxd` binary: parse the command line, load the configuration,
//! start logging, hand over to the library. `completions` and `man` are
//! answered before the configuration is loaded: they need none.

use std::process::ExitCode;

use clap::Parser;
use outboxd::cli::{self, Cli, Exit};
use outboxd::{config, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(exit) = cli::run_without_config(&cli.command) {
        return exit.into();
    }
    let config = match config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("outboxd: invalid configuration:\n{e}");
            return Exit::Usage.into();
        }
    };
    let log = logging::init(&config.log);
    if !config.ignored_env.is_empty() {
        tracing::warn!(
            variables = %config.ignored_env.join(", "),
            "ignoring OUTBOXD_ variables that are not settings (a setting is OUTBOXD_<SECTION>__<KEY>)"
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outboxd: cannot start the async runtime: {e}");
            return Exit::Failure.into();
        }
    };
    let exit = runtime.block_on(cli::run(cli.command, config, cli.config, log));
    // A DNS lookup runs on a blocking thread that cannot be cancelled;
    // dropping the runtime would wait for it. The stop budget gives it 1 s
    // (src/engine.rs).
    runtime.shutdown_timeout(outboxd::engine::RUNTIME_STOP);
    exit.into()
}
