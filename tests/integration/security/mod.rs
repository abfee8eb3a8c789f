//! Hostile peers and inputs (issue: close the trust boundary). Each test is named for
//! the attack it stages: a hostile consumer directory, target, probe answer, store
//! remote or local client, written as a small server or fixture on 127.0.0.1. Every one
//! of these failed on the main branch before the fix it covers.

mod daemon;
mod files;
mod peers;
mod remote;
