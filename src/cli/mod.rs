//! The `blobmgr` binary's commands: the command line ([`args`]), and one
//! module per command that does more than a call or two. `main.rs` parses
//! with [`args::Cli`] and hands the result to [`run`].
//!
//! Every failure ends as one line on standard error, `blobmgr: what`, and a
//! non-zero exit status: 2 for a command line clap refused, 1 for anything
//! that failed while running.

pub mod args;
mod cache_ls;
mod config;
mod fetch;
mod http;
mod lifecycle;
mod mount;
mod ping_cat;
mod serve;
pub mod size;
mod status;
mod upgrade;

use args::{CacheCommand, Cli, Command};
use blobmgr::client::Client;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::CommandFactory;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// `--version`: the package version, and the git commit it was built from
/// when built from a checkout (see build.rs).
pub const VERSION: &str = env!("BLOBMGR_VERSION");

/// A failure of a command, printed as `blobmgr: <message>`.
#[derive(Debug)]
pub struct Fail(pub String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Fail {
        Fail(e.to_string())
    }
}

/// Runs a parsed command line; returns the process's exit status.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(opts) => serve::run(opts),
        Command::Ping(a) => ping_cat::ping(a),
        Command::Cat(a) => ping_cat::cat(a),
        Command::Fetch(a) => fetch::run(a),
        Command::Status(a) => status::run(a),
        Command::Cache(CacheCommand::Ls(a)) => cache_ls::run(a),
        Command::Upgrade(a) => upgrade::run(&a.sock),
        Command::Mount(a) => mount::run(a),
        Command::Completions(a) => {
            let mut script = Vec::new();
            clap_complete::generate(a.shell, &mut Cli::command(), "blobmgr", &mut script);
            emit(&script)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg)) => {
            eprintln!("blobmgr: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Writes a command's output to standard output: an error (a closed pipe)
/// is a failure like any other, not a panic.
pub fn emit(out: &[u8]) -> Result<(), Fail> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out)
        .and_then(|()| stdout.flush())
        .map_err(|e| Fail(format!("write to stdout: {e}")))
}

/// The CLI's client: one command, so no reconnect retries beyond one.
pub fn cli_client(sock: &Path) -> Result<Client, Fail> {
    Client::builder()
        .connect_retries(1)
        .connect(sock)
        .map_err(Fail::from)
}

/// What to do with clap's refusal: `--help` and `--version` print and exit
/// 0; a real error is printed as one line (clap's own is a paragraph).
pub fn clap_exit(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("blobmgr: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// clap's error as one line, naming the option and the value.
fn one_line(e: &clap::Error) -> String {
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    if e.kind() == ErrorKind::ValueValidation {
        let arg = context(ContextKind::InvalidArg).unwrap_or_default();
        let flag = arg.split_whitespace().next().unwrap_or("value").to_string();
        let value = context(ContextKind::InvalidValue).unwrap_or_default();
        if let Some(source) = std::error::Error::source(e) {
            let source = source.to_string();
            return if source.contains(&format!("{value:?}")) {
                format!("{flag}: {source}")
            } else {
                format!("{flag}: {value:?} is not valid: {source}")
            };
        }
    }
    let text = e.render().to_string();
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // The help of the command that needs a subcommand: name it.
        let usage = text.lines().find_map(|l| l.strip_prefix("Usage: "));
        let path: Vec<&str> = usage
            .unwrap_or("blobmgr")
            .split_whitespace()
            .take_while(|w| !w.starts_with(['<', '[']))
            .collect();
        return match path.as_slice() {
            [] | ["blobmgr"] => "no command given; try --help".into(),
            p => format!(
                "{}: no command given; try '{} --help'",
                p.join(" "),
                p.join(" ")
            ),
        };
    }
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"));
    let first = lines.next().unwrap_or("invalid command line");
    let mut line = first.strip_prefix("error: ").unwrap_or(first).to_string();
    let rest: Vec<&str> = lines.collect();
    if let Some(head) = line.strip_suffix(':') {
        // "the following required arguments were not provided:" + a list.
        let items: Vec<&str> = rest
            .iter()
            .copied()
            .filter(|l| !l.starts_with("tip:"))
            .collect();
        line = format!("{head}: {}", items.join(", "));
    }
    for l in &rest {
        let similar = l.strip_prefix("tip: ").filter(|t| t.contains("similar"));
        if let Some(tip) = similar {
            line.push_str(&format!(" ({tip})"));
        } else if l.starts_with("[possible values") {
            line.push_str(&format!(" {l}"));
        }
    }
    line.push_str("; try --help");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn refusal(argv: &[&str]) -> String {
        let e = Cli::try_parse_from(argv).expect_err("refused");
        let line = one_line(&e);
        assert!(!line.contains('\n'), "{line:?}");
        line
    }

    #[test]
    fn clap_errors_become_one_line_naming_the_culprit() {
        let l = refusal(&["blobmgr", "serve", "--cache-size", "12Q"]);
        assert!(l.starts_with("--cache-size: \"12Q\" is not a size"), "{l}");
        let l = refusal(&["blobmgr", "serve", "--workers", "x"]);
        assert!(l.starts_with("--workers: \"x\" is not valid"), "{l}");
        let l = refusal(&["blobmgr", "serve", "--sokc", "x"]);
        assert!(l.contains("'--sokc'") && l.contains("--sock"), "{l}");
        let l = refusal(&["blobmgr"]);
        assert!(l.starts_with("no command given"), "{l}");
        let l = refusal(&["blobmgr", "cache"]);
        assert!(l.starts_with("blobmgr cache: no command given"), "{l}");
        let l = refusal(&["blobmgr", "cat"]);
        assert!(l.contains("BLOB_ID"), "{l}");
    }

    #[test]
    fn repeated_options_keep_the_last_and_repeatable_ones_add_up() {
        let cli = Cli::try_parse_from([
            "blobmgr",
            "serve",
            "--sock",
            "a",
            "--sock",
            "b",
            "--allow-uid",
            "1",
            "--allow-uid",
            "2",
        ])
        .unwrap();
        let Command::Serve(o) = cli.command else {
            panic!("serve")
        };
        assert_eq!(o.sock, Some("b".into()));
        assert_eq!(o.allow_uid, vec![1, 2]);
    }
}
