//! The `rotd` binary: parses the command line, sets up logging, and hands over to
//! the library (`rotd::commands::run`). Exit codes are the contract's (DESIGN §2).

use clap::Parser;
use rotd::cli::Cli;
use rotd::commands::{self, exit};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    exit::OK
                }
                _ => exit::USAGE,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROTD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rotd: cannot start the async runtime: {e}");
            std::process::exit(exit::NOT_ROLLED_BACK);
        }
    };
    let code = match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let err = anyhow::Error::from(e);
            let code = err
                .downcast_ref::<commands::Error>()
                .map(|e| e.exit_code())
                .unwrap_or(exit::ROLLED_BACK);
            eprintln!("rotd: {}", describe(&err));
            code
        }
    };
    std::process::exit(code);
}

/// The error and its causes in one line. Most of rotd's errors already name their
/// cause in their own text; a cause is appended only when it adds something.
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}
