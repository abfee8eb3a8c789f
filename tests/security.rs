//! Hostile peers and inputs (issue: close the trust boundary). Each test is named for
//! the attack it stages: a hostile consumer directory, target, probe answer, store
//! remote or local client, written as a small server or fixture on 127.0.0.1. Every one
//! of these failed on the main branch before the fix it covers.

mod util;

#[path = "security/daemon.rs"]
mod daemon;
#[path = "security/files.rs"]
mod files;
#[path = "security/peers.rs"]
mod peers;
#[path = "security/remote.rs"]
mod remote;
