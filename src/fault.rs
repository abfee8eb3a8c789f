//! The crash test hook: `ROTD_FAULT_KILL_AFTER=<step>` makes rotd SIGKILL itself right
//! after the named step, so the tests can prove with real kills what each step
//! guarantees (tests/integration/crash.rs for the rotator, tests/integration/agent.rs for
//! the agent).
//!
//! It is a leaf module so the rotation engine and the agent share one mechanism: the
//! same variable, the same log line, the same signal. Unset (as in production), it
//! does nothing.

/// The environment variable naming the step after which rotd kills itself.
pub const ENV: &str = "ROTD_FAULT_KILL_AFTER";

/// SIGKILLs this process when [`ENV`] names `step`; otherwise returns at once.
pub fn point(step: &str) {
    if std::env::var(ENV).as_deref() == Ok(step) {
        tracing::warn!(step, "ROTD_FAULT_KILL_AFTER: killing rotd");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
