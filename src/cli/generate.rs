//! `outboxd completions` and `outboxd man`: shell completion scripts and
//! man pages generated from the clap definitions, so they never disagree
//! with `--help`. They need no configuration and no database, so `main`
//! runs them before loading either (a packager can run them on a build host).

use std::io::Write;

use clap::CommandFactory;

use super::args::{Cli, Command};
use super::exit::{Exit, fail};

/// Runs the subcommands that need no configuration (`completions`, `man`);
/// `None` for every other one. Called before the configuration is loaded,
/// so a packager can generate completions on a build host.
pub fn run_without_config(command: &Command) -> Option<Exit> {
    let mut text = Vec::new();
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "outboxd", &mut text);
        }
        Command::Man { out_dir: None } => {
            // Writing into a Vec cannot fail.
            let _ = clap_mangen::Man::new(Cli::command()).render(&mut text);
        }
        Command::Man { out_dir: Some(dir) } => {
            return Some(match clap_mangen::generate_to(Cli::command(), dir) {
                Ok(()) => {
                    println!("wrote the man pages to {}", dir.display());
                    Exit::Ok
                }
                Err(e) => fail(&format!("writing man pages to {}: {e}", dir.display())),
            });
        }
        _ => return None,
    }
    let mut stdout = std::io::stdout().lock();
    Some(
        match stdout.write_all(&text).and_then(|()| stdout.flush()) {
            Ok(()) => Exit::Ok,
            // `outboxd man | head`: the reader has all it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Ok,
            Err(e) => fail(&format!("writing to stdout: {e}")),
        },
    )
}
