//! Commit messages as `history` and `verify` read their `Rotd-*` trailers back, and
//! the messages rotd writes: what it writes it reads back the same.
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::trailers(data));
