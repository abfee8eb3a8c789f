//! Recipient lines (`store.recipients`, written back as `.age-recipients`) and
//! identity lines (`store.identity`), loaded as rotd loads its keys.
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::recipients(data));
