//! The operator CLI run as real processes: completions and the man page.

use crate::harness::{Ran, TempDir, run};

/// Asserts the exit code and that stdout holds each of `want`.
#[track_caller]
pub fn expect(ran: &Ran, code: i32, want: &[&str]) {
    assert_eq!(ran.code, Some(code), "{ran:?}");
    for w in want {
        assert!(ran.stdout.contains(w), "{w:?} missing from stdout: {ran:?}");
    }
}

#[tokio::test]
async fn completions_and_man_pages_need_neither_config_nor_database() {
    let bare = |line: &str| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
        cmd.env("OUTBOXD_CONFIG", "/nonexistent/config.toml")
            .env("OUTBOXD_DATABASE__URL", "not a url")
            .args(line.split_whitespace());
        cmd
    };
    let bash = run(&mut bare("completions bash")).await;
    expect(
        &bash,
        0,
        &["_outboxd()", "complete -F _outboxd", "--out-dir"],
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let ran = run(&mut bare(&format!("completions {shell}"))).await;
        expect(&ran, 0, &["outboxd", "migrate"]);
    }
    let bad = run(&mut bare("completions tcsh")).await;
    assert_eq!(bad.code, Some(2), "{bad:?}");

    let man = run(&mut bare("man")).await;
    expect(&man, 0, &["completions", "migrate"]);
    // clap_mangen opens with two lines defining the apostrophe string (.ie
    // and .el); the page proper starts with .TH.
    let first = man
        .stdout
        .lines()
        .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"));
    assert!(first.unwrap().starts_with(".TH outboxd 1"), "{man:?}");

    let dir = TempDir::new("man");
    let out_dir = dir.0.to_str().unwrap();
    let pages = run(&mut bare(&format!("man --out-dir {out_dir}"))).await;
    expect(&pages, 0, &[]);
    for page in ["outboxd.1", "outboxd-migrate.1", "outboxd-completions.1"] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
}
