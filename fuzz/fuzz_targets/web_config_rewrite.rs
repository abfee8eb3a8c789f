//! The Prometheus web-config rewrite (set or remove users, render): the result
//! parses, holds exactly the intended users and keeps every foreign line.
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::web_config_rewrite(data));
