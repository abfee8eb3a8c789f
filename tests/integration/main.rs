//! rotd's integration tests, gathered into one test binary so that the harness
//! (`util`) and the rotd library are compiled and linked once, not once per file.
//! Each module is one area of behaviour, and its module doc says what it runs against
//! (real git, `age`, `ssh-keygen`, `sshd`, Prometheus; the Elasticsearch emulator is
//! the dev-only crate `crates/es-emulator`). Run one area with its module path as the
//! filter, e.g. `cargo test --test integration agent::`.
//!
//! All modules share one process: a test changes no process-wide state (environment,
//! working directory, umask, signal handlers) and counts only its children's
//! resources, never the test process's own. The one exception is the control-socket
//! flood in `security::daemon`, which raises this process's soft open-files limit to
//! its hard limit: it only adds headroom for every other test.

mod util;

mod acks;
mod agent;
mod audit;
mod basics;
mod consumers;
mod crash;
mod daemon;
mod elasticsearch;
mod elasticsearch_user;
mod examples;
mod faults;
mod fleet;
mod fuzz_smoke;
mod hygiene;
mod prometheus;
mod remote;
mod security;
mod signing_interop;
mod slots;
mod ssh_remote;
