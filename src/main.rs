//! The `blobmgr` binary: parses the command line (clap, `cli::args`) and
//! hands it to the command that runs it (`cli`).

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli::args::Cli::try_parse() {
        Ok(parsed) => cli::run(parsed),
        Err(e) => cli::clap_exit(e),
    }
}
