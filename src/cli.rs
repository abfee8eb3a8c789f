//! The command line (DESIGN §2, contract). Kept in the library so that man pages and
//! shell completions can be generated from the same definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rotd",
    version,
    about = "Secret-rotation daemon: age-encrypted git store, safe rotation with real probes"
)]
pub struct Cli {
    /// Configuration file [default: /etc/rotd/rotd.toml]
    #[arg(long, global = true, env = "ROTD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the store repository and, if missing, the daemon's age identity
    Init,
    /// Validate the configuration and every schedule; errors name file:line and the fix
    Check,
    /// The daemon (foreground): schedules, control socket, metrics
    Run,
    /// Ask the running daemon to re-read the schedules
    Reload,
    /// Rotate now (through the running daemon when there is one)
    Rotate {
        /// Secrets to rotate
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        names: Vec<String>,
        /// Rotate every scheduled secret
        #[arg(long)]
        all: bool,
        /// Print the plan and touch nothing
        #[arg(long)]
        dry_run: bool,
        /// A leak: rotate NAME and, once the new credential is proven, retire the old
        /// one at once, whatever its grace and the consumers' acknowledgements
        /// (laggards are cut off); recorded with `Rotd-Emergency: yes`
        #[arg(long, conflicts_with_all = ["all", "dry_run"], requires = "names", num_args = 0)]
        emergency: bool,
    },
    /// Per secret: state, last rotation, age, next run, last error
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The audit trail, read from git
    History {
        name: Option<String>,
        #[arg(long)]
        json: bool,
        /// Only commits newer than this: a duration ("7d", "12h") or an RFC 3339 time
        #[arg(long, value_name = "DURATION|RFC3339")]
        since: Option<String>,
        /// Only commits with this step (succeeded, rolled-back, failed, pending, ...)
        #[arg(long, value_name = "STEP")]
        outcome: Option<String>,
    },
    /// Adopt a credential that is live today (secret on stdin)
    Import {
        name: String,
        #[arg(long)]
        username: Option<String>,
        #[arg(long = "key-id")]
        key_id: Option<String>,
    },
    /// Carry out retirements whose grace has passed (of NAME only, when given)
    Retire {
        /// Only this secret
        #[arg(required_if_eq("force", "true"))]
        name: Option<String>,
        /// Retire NAME's previous credential now, before its grace ends (recorded
        /// with who ran it): every consumer must use the current credential already
        #[arg(long)]
        force: bool,
    },
    /// Decrypt and print the current value (needs the identity)
    Show { name: String },
    /// Audit the whole store history; exit 1 on findings
    Verify {
        #[arg(long)]
        json: bool,
        /// git allowed-signers file [default: store.allowed_signers, else the signing key]
        #[arg(long, value_name = "PATH")]
        allowed_signers: Option<PathBuf>,
        /// This commit and its ancestors need no signature (history from before signing)
        #[arg(long, value_name = "COMMIT")]
        accept_unsigned_before: Option<String>,
    },
    /// Re-encrypt every secret to the current recipients, in one commit
    Rekey {
        /// When a recipient was removed, rotate every scheduled secret afterwards
        #[arg(long)]
        rotate_removed: bool,
    },
    /// On a consumer host: pull this host's secrets from the store remote, deliver them,
    /// acknowledge (config: --config, default /etc/rotd/agent.toml)
    #[command(args_conflicts_with_subcommands = true)]
    Agent {
        /// Run one pass, then exit
        #[arg(long)]
        once: bool,
        #[command(subcommand)]
        action: Option<AgentCommand>,
    },
}

/// `rotd agent` subcommands (without one, the agent runs).
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Per secret: the rotation delivered and acknowledged, the last pass and error
    /// (read from the agent's clone: nothing fetched, nothing decrypted)
    Status {
        #[arg(long)]
        json: bool,
    },
}
