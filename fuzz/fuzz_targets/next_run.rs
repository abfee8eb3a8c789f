//! `next_run` and the other scheduler arithmetic for every schedule that
//! `rotd check` accepts without a problem.
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::next_run(data));
