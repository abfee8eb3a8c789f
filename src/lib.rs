//! rotd — a secret-rotation daemon for observability pipelines.
//!
//! # Layout
//!
//! ```text
//!  cli/commands ──► rotation::Engine ──► targets::Config (enum: prometheus, files)
//!                        │   │                 apply / probe / rollback / retire
//!                        │   └──────────────► deliver (templates → files → reloads)
//!                        ▼
//!                   store::Store  (git2 + age: the journal, the audit trail, the lock)
//!                        │
//!                   secrets/NAME.age, secrets/NAME.pending.age, .age-recipients
//! ```
//!
//! * [`config`] parses `rotd.toml` and `schedules/*.toml` into a checked [`config::Config`].
//! * [`store`] is the git repository of age-encrypted [`store::Record`]s; every change is
//!   a commit with `Rotd-*` trailers, made under a `flock`.
//! * [`rotation`] is the engine: plan → pending commit → apply → deliver → probe →
//!   succeeded commit → retire, with rollback and crash recovery; its module doc states
//!   what each step guarantees.
//! * [`targets`] holds one file per target kind, each with its probe beside it.
//! * [`deliver`] renders consumer files and runs reloads.
//! * [`secret`] is the redacting [`secret::Secret`] type and the CSPRNG generator.
//! * [`audit`] is `rotd verify`: signatures, plaintext leaks, trailers, recipients.
//! * [`agent`] is `rotd agent` on a consumer host: pulls signed store commits, delivers, acknowledges.
//! * [`history`] reads the audit trail back from git.
//! * [`signing`] makes and checks the SSH signatures (sshsig) of store commits.
//! * Leaves used by the layers above: [`fault`] (the crash test hook
//!   `ROTD_FAULT_KILL_AFTER`, shared by the rotator and the agent), [`http`] (the one HTTP client: no redirect
//!   followed, body cap, error wording), [`redact`] (credentials scrubbed from peers'
//!   text, then cut), [`validate`] (formats of values from peers and stdin).
//!
//! Blocking work (git2, age, bcrypt, fsync) runs in `spawn_blocking`; HTTP (probes,
//! reloads) is async on tokio.

pub mod agent;
pub mod audit;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod fault;
pub mod fsutil;
pub mod history;
pub mod http;
pub mod metrics;
pub mod redact;
pub mod rekey;
pub mod rotation;
pub mod secret;
pub mod signing;
pub mod status;
pub mod store;
pub mod targets;
pub mod validate;
