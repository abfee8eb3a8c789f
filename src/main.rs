//! The `rotd` binary: hardens the process, parses the command line, sets up logging,
//! and hands over to the library (`rotd::commands::run`). Exit codes are the
//! contract's (DESIGN §2).

use clap::Parser;
use rotd::cli::Cli;
use rotd::commands::{self, exit};

fn main() {
    // First, before any secret is read: see `harden`.
    let hardening = harden();
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
    if let Err(e) = hardening {
        tracing::warn!(error = %e, "cannot make the process non-dumpable or turn off its core dumps; secrets in memory may reach a core file");
    }
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

/// Keeps the secrets in this process's memory out of core files and away from other
/// processes of the same user: no core dump at all (`RLIMIT_CORE` 0, soft and hard),
/// and not dumpable (`PR_SET_DUMPABLE` 0), which also makes `/proc/PID/mem`,
/// `environ` and ptrace unavailable to anyone but root. A program rotd runs (an
/// `exec` reload) is dumpable again after its `execve`.
///
/// Not done: `mlock` of key material. The secrets live in buffers of age, bcrypt,
/// rustls and serde that rotd does not allocate, so locking only its own copies would
/// be a promise it cannot keep, and `mlockall` would run into `RLIMIT_MEMLOCK` (8 MiB
/// by default) in a daemon that also runs git. Use encrypted (or no) swap; rotd's own
/// secret buffers are zeroized when dropped.
fn harden() -> anyhow::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    nix::sys::prctl::set_dumpable(false)?;
    Ok(())
}
